"""`xmdpt pose`: OpenPose-18 keypoints from photos (MediaPipe), as our JSON plus a skeleton preview."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)


def pose(
    images: Annotated[list[Path], typer.Argument(help="Photos of people.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    size: Annotated[str | None, typer.Option(help="Bring photos into this frame HxW first, e.g. 256x176.")] = None,
    fit: Annotated[str, typer.Option(help="crop, pad or stretch, when --size changes the aspect.")] = "crop",
    min_visibility: Annotated[float, typer.Option(help="Drop joints MediaPipe sees less than this.")] = 0.5,
) -> None:
    """Extract OpenPose-18 keypoints: writes OUT/<name>.png (the photo in the keypoints' frame), OUT/<name>.json
    and OUT/<name>_skeleton.png; OUT is then a folder data set."""
    from PIL import Image

    from xmdpt.cli.data import parse_size
    from xmdpt.errors import InputError, require_file
    from xmdpt.inputs import FITS
    from xmdpt.pose.extract import PoseExtractor, extract_file
    from xmdpt.pose.render import draw_skeleton

    frame = parse_size(size) if size else None
    if fit not in FITS:
        raise InputError(f"unknown fit {fit!r}; use {', '.join(FITS)}")
    for path in images:  # before MediaPipe opens, which takes a while and talks on stderr
        require_file(path, "image file")
    out.mkdir(parents=True, exist_ok=True)
    with PoseExtractor(min_visibility) as extractor:
        for path in images:
            image, found = extract_file(path, extractor, frame, fit)  # type: ignore[arg-type]
            stem = out / Path(path).stem
            image.save(stem.with_suffix(".png"))
            found.pose.save_json(stem.with_suffix(".json"), scores=found.scores, image=stem.with_suffix(".png").name)
            Image.fromarray(draw_skeleton(found.pose)).save(f"{stem}_skeleton.png")
            typer.echo(f"{path}: {int(found.pose.present.sum())} of 18 joints -> {stem.with_suffix('.json')}")
