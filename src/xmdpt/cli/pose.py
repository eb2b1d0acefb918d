"""`xmdpt pose`: OpenPose-18 keypoints from photos (MediaPipe), as our JSON plus a skeleton preview."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)


def output_paths(out: Path, photo: Path) -> tuple[Path, Path, Path]:
    """(photo in the keypoints' frame, keypoints, skeleton preview) that `pose` writes for `photo`.

    Named by appending to the whole stem: `with_suffix` would cut 'a.v2' to 'a' and let a.v1.jpg and a.v2.jpg collide.
    """
    stem = out / photo.stem
    return Path(f"{stem}.png"), Path(f"{stem}.json"), Path(f"{stem}_skeleton.png")


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:  # a hard link, or a path resolve() cannot see through
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def check_outputs(images: list[Path], out: Path) -> None:
    """Refuse, before anything is written, outputs that would replace an input photo or another photo's outputs:
    `--out .` beside a photo.png would overwrite it with its cropped copy."""
    from xmdpt.errors import InputError

    written: dict[Path, Path] = {}  # output (resolved) -> the photo it belongs to
    for photo in images:
        for output in output_paths(out, photo):
            for other in images:
                if _same_file(output, other):
                    raise InputError(
                        f"{other}: --out {out} would write over this input (as {output.name}); choose another --out"
                    )
            key = output.resolve()
            if key in written and not _same_file(written[key], photo):
                raise InputError(
                    f"{photo}: its outputs would overwrite those of {written[key]} ({output.name}); rename one "
                    f"of the photos or run them separately"
                )
            written[key] = photo


def pose(
    images: Annotated[list[Path], typer.Argument(help="Photos of people.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    size: Annotated[str | None, typer.Option(help="Bring photos into this frame HxW first, e.g. 256x176.")] = None,
    fit: Annotated[str, typer.Option(help="crop, pad or stretch, when --size changes the aspect.")] = "crop",
    min_visibility: Annotated[float, typer.Option(help="Drop joints MediaPipe sees less than this.")] = 0.5,
) -> None:
    """Extract OpenPose-18 keypoints: writes OUT/<name>.png (the photo in the keypoints' frame), OUT/<name>.json
    and OUT/<name>_skeleton.png; OUT is then a folder data set. Outputs never replace an input photo."""
    from PIL import Image

    from xmdpt.cli.data import parse_size
    from xmdpt.errors import InputError, require_file
    from xmdpt.inputs import FITS
    from xmdpt.pose.extract import PoseExtractor, extract_file
    from xmdpt.pose.render import draw_skeleton

    frame = parse_size(size) if size else None
    if fit not in FITS:
        raise InputError(f"unknown fit {fit!r}; use {', '.join(FITS)}")
    for path in images:  # before MediaPipe opens, which takes a while
        require_file(path, "image file")
    check_outputs(images, out)
    out.mkdir(parents=True, exist_ok=True)
    with PoseExtractor(min_visibility) as extractor:
        for path in images:
            image, found = extract_file(path, extractor, frame, fit)  # type: ignore[arg-type]
            photo, keypoints, preview = output_paths(out, path)
            image.save(photo)
            found.pose.save_json(keypoints, scores=found.scores, image=photo.name)
            Image.fromarray(draw_skeleton(found.pose)).save(preview)
            typer.echo(f"{path}: {int(found.pose.present.sum())} of 18 joints -> {keypoints}")
