"""DeepFashion preparation: In-shop `img_highres` -> the flat-named 256x176 (and 512x352) images of the GFLA layout.

The user brings the In-shop `img_highres` folder (password from the DeepFashion maintainers) and the split files of
the GFLA/PATN line of work (`fasion-resize-pairs-{train,test}.csv`, `fasion-resize-annotation-{train,test}.csv`,
optionally `train.lst` / `test.lst`). Every name in them is mapped to its In-shop path, checked, resized and written
as `OUT/{split}/<flat name>` (256x176) or `OUT/{split}_{H}x{W}/<flat name>` (other sizes), and the split files are
copied beside, so that `deepfashion_csv(OUT, split)` reads the result. A square source (In-shop's 256x256 `img`)
is first cropped to x in [40, 216) of 256, as the Pose-Transfer preparation does; a high-res source (750x1101,
nearly the 176:256 aspect) is resized directly.

Resumable: finished images are skipped, and each is written to a temporary name then renamed, so an interrupted run
leaves no half-written file. Missing or unreadable sources are listed in `OUT/missing-images.txt` and reported.
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from xmdpt.data.deepfashion import _csv_rows
from xmdpt.data.images import load_image
from xmdpt.data.names import flat_to_inshop
from xmdpt.errors import InputError

log = logging.getLogger(__name__)
SPLITS = ("train", "test")
DEFAULT_SIZE = (256, 176)


@dataclass
class PrepareReport:
    written: int = 0
    skipped_existing: int = 0
    missing: list[str] = field(default_factory=list)  # "name: reason"

    def __str__(self) -> str:
        return f"{self.written} written, {self.skipped_existing} already there, {len(self.missing)} missing/unreadable"


def split_names(splits_dir: Path) -> dict[str, list[str]]:
    """Image names per split, from the pair files (both columns), annotation files and .lst files present."""
    names: dict[str, list[str]] = {}
    present = []  # split files that exist, so that an empty one is named as empty rather than missing
    for split in SPLITS:
        found: dict[str, None] = {}  # ordered set
        pairs = splits_dir / f"fasion-resize-pairs-{split}.csv"
        if pairs.is_file():
            present.append(pairs.name)
            for number, row in _csv_rows(pairs, ",", ("from", "to")):
                if len(row) != 2 or not all(c.strip() for c in row):
                    raise InputError(f"{pairs}:{number}: expected 'from,to' (two image names), got {','.join(row)!r}")
                found.update(dict.fromkeys(c.strip() for c in row))
        annotation = splits_dir / f"fasion-resize-annotation-{split}.csv"
        if annotation.is_file():
            present.append(annotation.name)
            for number, row in _csv_rows(annotation, ":", ("name", "keypoints_y", "keypoints_x")):
                if len(row) != 3:
                    raise InputError(
                        f"{annotation}:{number}: expected 'name:[18 ys]:[18 xs]', got {':'.join(row)[:80]!r}"
                    )
                found[row[0].strip()] = None
        listing = splits_dir / f"{split}.lst"
        if listing.is_file():
            present.append(listing.name)
            found.update(dict.fromkeys(line.strip() for line in listing.read_text().splitlines() if line.strip()))
        if found:
            names[split] = list(found)
    if not names and present:
        raise InputError(f"{splits_dir}: the split files name no images ({', '.join(present)})")
    if not names:
        raise InputError(
            f"{splits_dir}: no split files found (fasion-resize-pairs-{{train,test}}.csv, "
            "fasion-resize-annotation-{train,test}.csv or {train,test}.lst)"
        )
    return names


def source_root(img_dir: Path) -> Path:
    """The folder holding MEN/ and WOMEN/: `img_highres` itself or its `img/` child, as the zip unpacks."""
    if not img_dir.is_dir():
        raise InputError(f"{img_dir}: In-shop image folder not found")
    for candidate in (img_dir, img_dir / "img", img_dir / "img_highres"):
        if (candidate / "MEN").is_dir() or (candidate / "WOMEN").is_dir():
            return candidate
    raise InputError(f"{img_dir}: no MEN/ or WOMEN/ folder inside; point this at the unpacked In-shop img_highres")


def output_dir(out_dir: Path, split: str, size: tuple[int, int]) -> Path:
    return out_dir / split if tuple(size) == DEFAULT_SIZE else out_dir / f"{split}_{size[0]}x{size[1]}"


def resize_person(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crop In-shop's square padding if present, then resize to `size` = (height, width) with bicubic filtering."""
    w, h = image.size
    if w == h:  # the 256x256 In-shop images carry 40/256 white bands on each side
        image = image.crop((round(w * 40 / 256), 0, round(w * 216 / 256), h))
    return image.resize((size[1], size[0]), Image.BICUBIC)


def prepare_deepfashion(
    img_dir: str | Path,
    splits_dir: str | Path,
    out_dir: str | Path,
    sizes: tuple[tuple[int, int], ...] = (DEFAULT_SIZE,),
    workers: int = 2,
    progress: bool = True,
    strict: bool = True,
) -> PrepareReport:
    """Write the resized images and copy the split files; raise `InputError` at the end if sources were missing
    (`strict`), after everything that could be done was done."""
    img_root, splits_dir, out_dir = source_root(Path(img_dir)), Path(splits_dir), Path(out_dir)
    names = split_names(splits_dir)
    report = PrepareReport()
    jobs = []
    for split, split_list in names.items():
        for size in sizes:
            output_dir(out_dir, split, size).mkdir(parents=True, exist_ok=True)
        for name in split_list:
            targets = [output_dir(out_dir, split, size) / name for size in sizes]
            todo = [(t, s) for t, s in zip(targets, sizes, strict=True) if not t.is_file()]
            report.skipped_existing += len(targets) - len(todo)
            if todo:
                jobs.append((name, todo))

    def work(job: tuple[str, list]) -> tuple[int, str | None]:
        name, todo = job
        try:
            source = img_root / flat_to_inshop(name)
            if not source.is_file():
                return 0, f"{name}: not found at {source}"
            image = load_image(source)
        except InputError as err:
            return 0, f"{name}: {err}"
        for target, size in todo:
            tmp = target.with_name(f".{target.name}.part")
            resize_person(image, size).save(
                tmp, format=Image.registered_extensions().get(target.suffix.lower(), "PNG"), quality=95
            )
            os.replace(tmp, target)
        return len(todo), None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for written, problem in tqdm(pool.map(work, jobs), total=len(jobs), desc="resize", disable=not progress):
            report.written += written
            if problem:
                report.missing.append(problem)

    for split in names:
        for pattern in (f"fasion-resize-pairs-{split}.csv", f"fasion-resize-annotation-{split}.csv", f"{split}.lst"):
            if (splits_dir / pattern).is_file() and splits_dir.resolve() != out_dir.resolve():
                shutil.copyfile(splits_dir / pattern, out_dir / pattern)
    missing_file = out_dir / "missing-images.txt"
    if report.missing:
        missing_file.write_text("\n".join(report.missing) + "\n")
    elif missing_file.exists():
        missing_file.unlink()
    log.info("prepare-deepfashion: %s", report)
    if report.missing and strict:
        raise InputError(
            f"{len(report.missing)} images named in the split files are missing or unreadable under {img_root} "
            f"(first: {report.missing[0]}); full list in {missing_file}"
        )
    return report
