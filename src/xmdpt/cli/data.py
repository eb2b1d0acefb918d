"""`xmdpt data ...`: DeepFashion preparation, the synthetic generator, and a data set check."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from xmdpt.errors import InputError

app = typer.Typer(no_args_is_help=True)
log = logging.getLogger(__name__)


def parse_size(text: str) -> tuple[int, int]:
    """'256x176' -> (256, 176): height x width, as the field writes image sizes."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 256x176") from None
    if height < 1 or width < 1:
        raise InputError(f"size {text!r} must be positive")
    return height, width


class Layout(str, Enum):
    deepfashion = "deepfashion"
    market = "market"
    pidm = "pidm"
    folder = "folder"


@app.command("prepare-deepfashion")
def prepare_deepfashion(
    img_highres: Annotated[Path, typer.Argument(help="The unpacked In-shop img_highres folder (holds MEN/, WOMEN/).")],
    out_dir: Annotated[Path, typer.Argument(help="Where the resized images and split files go.")],
    splits: Annotated[
        Path,
        typer.Option(help="Folder with fasion-resize-{pairs,annotation}-{train,test}.csv and/or {train,test}.lst."),
    ],
    size: Annotated[list[str], typer.Option(help="Output size(s) HxW; repeat for several.")] = ["256x176"],  # noqa: B006
    workers: Annotated[int, typer.Option(help="Parallel resize threads.")] = 2,
    allow_missing: Annotated[bool, typer.Option(help="Report missing images without failing.")] = False,
) -> None:
    """Resize In-shop img_highres to the flat-named 256x176 (and e.g. 512x352) images; resumable."""
    from xmdpt.data.prepare import prepare_deepfashion as run

    report = run(img_highres, splits, out_dir, tuple(parse_size(s) for s in size), workers, strict=not allow_missing)
    typer.echo(str(report))


@app.command("synth")
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Output folder (DeepFashion CSV layout).")],
    num_identities: Annotated[int, typer.Option(help="Number of figures (identities).")] = 100,
    size: Annotated[str, typer.Option(help="Image size HxW, e.g. 64x44 or 256x176.")] = "64x44",
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same set.")] = 0,
    poses_per_identity: Annotated[int, typer.Option(help="Images (poses) per identity.")] = 4,
    test_fraction: Annotated[float, typer.Option(help="Share of identities held out for the test split.")] = 0.1,
    masks: Annotated[bool, typer.Option(help="Also write figure masks to masks/.")] = True,
    pattern_cell: Annotated[
        tuple[float, float], typer.Option(help="Range of stripe / check cell sizes, figure units (LOW HIGH).")
    ] = (0.025, 0.06),
) -> None:
    """Generate the synthetic data set of clothed articulated figures."""
    from xmdpt.data.synthetic import SynthConfig, generate

    config = SynthConfig(
        num_identities, poses_per_identity, parse_size(size), seed, test_fraction, masks, pattern_cell
    )
    counts = generate(out_dir, config)
    typer.echo(", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))


@app.command("check")
def check(
    root: Annotated[Path, typer.Argument(help="Data set folder.")],
    layout: Annotated[Layout, typer.Option(help="How the folder is organised.")] = Layout.deepfashion,
    split: Annotated[str, typer.Option(help="train or test (not for folder).")] = "test",
    keep_going: Annotated[bool, typer.Option(help="List every bad sample instead of stopping at the first.")] = False,
) -> None:
    """Read every pair line, image and pose of a data set; exit 2 at the first bad one (or list them all)."""
    from xmdpt.data import deepfashion as df

    fail_fast = not keep_going
    if layout is Layout.folder:
        dataset = df.FolderPairs(root=root, fail_fast=fail_fast)
    elif layout is Layout.pidm:
        dataset = df.PidmPairs(root=root, split=split, fail_fast=fail_fast)
    elif layout is Layout.market:
        dataset = df.market1501(root, split, fail_fast=fail_fast)
    else:
        dataset = df.deepfashion_csv(root, split, fail_fast=fail_fast)
    problems = dataset.validate()
    images = {n for r in dataset.pairs for n in (*r.sources, r.target)}
    for problem in problems:
        typer.echo(problem, err=True)
    bad = len(problems) + dataset.skipped
    typer.echo(f"{len(dataset)} pairs, {len(images)} images, {bad} bad")
    if bad:
        raise typer.Exit(2)
