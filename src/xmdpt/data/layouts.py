"""Conversion between the two DeepFashion layouts: GFLA/PATN (flat names, CSV) and PIDM/NTED (In-shop paths, txt).

GFLA/PATN: `{split}/<flat name>`, `fasion-resize-pairs-{split}.csv` (from,to) and
`fasion-resize-annotation-{split}.csv` (name:ys:xs, 256x176 frame).
PIDM/NTED: `img/<In-shop path>`, `{split}_pairs.txt` (target,source per line) and `pose/<In-shop path>.txt`
(rows `x y`, 256x256 frame with the 40 px pad). Images are hard-linked where possible (copied otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from xmdpt.data.deepfashion import CsvPairs, PidmPairs
from xmdpt.data.images import find_image
from xmdpt.data.names import flat_to_inshop, inshop_to_flat
from xmdpt.errors import InputError
from xmdpt.pose.keypoints import Pose


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, target)


def csv_to_pidm(csv_root: str | Path, out_root: str | Path, split: str) -> None:
    """Write the PIDM layout of one split of a GFLA/PATN-layout folder (masks/ follow the images)."""
    csv_root, out_root = Path(csv_root), Path(out_root)
    data = CsvPairs(root=csv_root, split=split, fail_fast=True)
    lines = [f"img/{flat_to_inshop(r.target)},img/{flat_to_inshop(r.sources[0])}" for r in data.pairs]
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / f"{split}_pairs.txt").write_text("\n".join(lines) + "\n")
    for name in data.annotations:
        relative = flat_to_inshop(name)
        pose_path = PidmPairs.pose_path(out_root, "img/" + relative)
        pose_path.parent.mkdir(parents=True, exist_ok=True)
        pose_path.write_text(data.pose(name).to_pidm_text())
        image = find_image(data.images_dir / name)
        if image is None:
            raise InputError(f"{data.images_dir / name}: image file not found")
        _link(image, out_root / "img" / Path(relative).with_suffix(image.suffix))
        mask = csv_root / "masks" / Path(name).with_suffix(".png")
        if mask.is_file():
            _link(mask, out_root / "masks" / "img" / Path(relative).with_suffix(".png"))


def pidm_to_csv(pidm_root: str | Path, out_root: str | Path, split: str) -> None:
    """Write the GFLA/PATN layout of one split of a PIDM-layout folder: one CSV pair per (source, target)."""
    pidm_root, out_root = Path(pidm_root), Path(out_root)
    data = PidmPairs(root=pidm_root, split=split, fail_fast=True)
    (out_root / split).mkdir(parents=True, exist_ok=True)
    pairs, names = [], {}
    for record in data.pairs:
        for source in record.sources:
            pairs.append(f"{inshop_to_flat(source)},{inshop_to_flat(record.target)}")
        for name in (*record.sources, record.target):
            names.setdefault(name, None)
    (out_root / f"fasion-resize-pairs-{split}.csv").write_text("from,to\n" + "\n".join(pairs) + "\n")
    annotations = ["name:keypoints_y:keypoints_x"]
    for name in names:
        flat = inshop_to_flat(name)
        ys, xs = Pose.from_pidm_file(PidmPairs.pose_path(pidm_root, name)).to_gfla()
        annotations.append(f"{flat}:{json.dumps(ys)}:{json.dumps(xs)}")
        image = find_image(pidm_root / name)
        if image is None:
            raise InputError(f"{pidm_root / name}: image file not found")
        _link(image, out_root / split / Path(flat).with_suffix(image.suffix))
        mask = pidm_root / "masks" / Path(name).with_suffix(".png")
        if mask.is_file():
            _link(mask, out_root / "masks" / Path(flat).with_suffix(".png"))
    (out_root / f"fasion-resize-annotation-{split}.csv").write_text("\n".join(annotations) + "\n")
