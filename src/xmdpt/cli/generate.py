"""`xmdpt generate`: re-pose a person from the shell, one pair or a CSV of pairs.

Batch mode reads a CSV with the header `reference,pose[,out]`: paths relative to the CSV's folder, `out` relative to
`--out-dir` (default name `<CSV line number>-<reference>-<pose>.png`). A bad line (missing file, unreadable image,
malformed pose, no person found) is reported as one line on stderr and skipped, the rest are generated, and the run
then exits with 2 if any line failed. Data line i (from 0) samples with seed `--seed + i`, so each image is the one
single mode gives for that pair with that seed (exactly so for the deterministic samplers ddim and dpmsolver++).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from xmdpt.errors import InputError, require_file
from xmdpt.examples import example_pose_names, example_pose_path, pose_argument
from xmdpt.settings import PRECISIONS, SAMPLERS

log = logging.getLogger(__name__)
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


Sampler = Enum("Sampler", {name: name for name in SAMPLERS}, type=str)
Precision = Enum("Precision", {name: name for name in PRECISIONS}, type=str)
FitChoice = Enum("FitChoice", {name: name for name in ("pad", "crop", "stretch")}, type=str)
# The sampling options that `generate` and `evaluate` share; each defaults to the model's own setting.
StepsOption = Annotated[int | None, typer.Option(min=1, max=1000, help="Sampling steps; default: the model's.")]
GuidanceOption = Annotated[float | None, typer.Option(help="Guidance scale; default: the model's.")]
PrecisionOption = Annotated[
    Precision | None,
    typer.Option("--dtype", help="fp32, bf16, fp16, or auto: bf16 on AMX or AVX512-BF16 CPUs and Ampere+ GPUs."),
]


def _checked_cache(value: str | None) -> str | None:
    """--cache checked before any model loads."""
    from xmdpt.settings import parse_cache

    if value is not None:
        parse_cache(value)
    return value


CacheOption = Annotated[
    str | None,
    typer.Option(
        callback=_checked_cache,
        help="Reuse the blocks' work across steps: none, fora:N (e.g. fora:2) or teacache:D (e.g. teacache:0.1); "
        "default: the model's.",
    ),
]
GuidanceIntervalOption = Annotated[
    str | None, typer.Option(help="Guide only at timesteps LO,HI (e.g. 200,800), or 'all'; default: the model's.")
]


@dataclass(frozen=True)
class PairLine:
    """One data line of the pairs CSV, paths resolved."""

    where: str  # "pairs.csv:3", for messages
    index: int  # data line number from 0: the seed offset
    reference: Path
    pose: Path
    out: Path


def check_output_path(path: Path) -> Path:
    """An image file name in a folder we can write, checked before any sampling."""
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"{path}: output must be an image file ({', '.join(OUTPUT_SUFFIXES)})")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give an image file name")
    check_output_folder(path.parent)
    return path


def check_output_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{folder}: cannot create the output folder ({err.strerror or err})") from None
    if not os.access(folder, os.W_OK):
        raise InputError(f"{folder}: the output folder is not writable")


def read_pairs(csv_path: Path, out_dir: Path) -> tuple[list[PairLine], list[str]]:
    """Data lines of the pairs CSV, and one message per malformed line (the file itself must be readable)."""
    require_file(csv_path, "pairs file")
    try:
        rows = list(csv.reader(csv_path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{csv_path}: cannot read the pairs file ({err})") from None
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    if header[:2] != ["reference", "pose"] or header[2:] not in ([], ["out"]):
        raise InputError(f"{csv_path}: the first line must be the header 'reference,pose' or 'reference,pose,out'")
    base, lines, problems, index, outs = csv_path.parent, [], [], 0, {}
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{csv_path}:{number}"
        cells = [cell.strip() for cell in row]
        if len(cells) not in (2, len(header)) or not cells[0] or not cells[1]:
            problems.append(f"{where}: expected '{','.join(header)}', got {','.join(row)!r}")
            index += 1
            continue
        reference, pose = base / cells[0], base / cells[1]
        if not pose.exists() and cells[1] in example_pose_names():  # a shipped example pose, by name
            pose = example_pose_path(cells[1])
        name = cells[2] if len(cells) > 2 and cells[2] else f"{number:04d}-{reference.stem}-{pose.stem}.png"
        out = Path(name)
        if out.is_absolute() or ".." in out.parts:
            problems.append(f"{where}: out {name!r} must be a relative path inside --out-dir")
        elif out.suffix.lower() not in OUTPUT_SUFFIXES:
            problems.append(f"{where}: out {name!r} must be an image file ({', '.join(OUTPUT_SUFFIXES)})")
        elif out in outs:
            problems.append(f"{where}: out {name!r} is already line {outs[out]}'s output")
        elif not (out_dir / out).resolve().is_relative_to(out_dir.resolve()):  # a symlink inside --out-dir
            problems.append(f"{where}: out {name!r} leads outside --out-dir (through a symbolic link)")
        elif (out_dir / out).is_dir():
            problems.append(f"{where}: out {name!r} is a folder in --out-dir")
        else:
            outs[out] = number
            lines.append(PairLine(where, index, reference, pose, out_dir / out))
        index += 1
    # No command writes over a user's input: an output that is any line's reference or pose (or the CSV itself).
    inputs = {csv_path.resolve()} | {path.resolve() for line in lines for path in (line.reference, line.pose)}
    for line in [line for line in lines if line.out.resolve() in inputs]:
        lines.remove(line)
        problems.append(f"{line.where}: out {line.out} is an input of this batch; it is never written over")
    return lines, problems


def generate(
    reference: Annotated[Path | None, typer.Option(help="Photo of the person (single mode).")] = None,
    pose: Annotated[
        Path | None,
        typer.Option(
            help="Target pose: keypoint file (.json ours, .txt PIDM), a driving photo, or a shipped example pose "
            f"by name ({', '.join(example_pose_names())})."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output image (single mode).")] = None,
    pairs: Annotated[Path | None, typer.Option(help="Batch mode: CSV with header reference,pose[,out].")] = None,
    out_dir: Annotated[Path | None, typer.Option(help="Batch mode: folder for the images.")] = None,
    model: Annotated[str | None, typer.Option(help="Pipeline folder or Hub id; default: the embedded model.")] = None,
    steps: StepsOption = None,
    guidance: GuidanceOption = None,
    guidance_interval: GuidanceIntervalOption = None,
    dtype: PrecisionOption = None,
    cache: CacheOption = None,
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="Random seed (batch line i uses seed + i).")] = 0,
    sampler: Annotated[Sampler | None, typer.Option(help="The sampler; default: the model's.")] = None,
    fit: Annotated[FitChoice, typer.Option(help="Bring photos to the model's frame.")] = FitChoice.pad,
    batch_size: Annotated[int, typer.Option(min=1, max=256, help="Batch mode: pairs per forward pass.")] = 4,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1...; default: cuda if present.")] = None,
) -> None:
    """Generate the reference person in the target pose: --reference --pose --out, or --pairs --out-dir."""
    from xmdpt.settings import parse_guidance_interval

    single = reference is not None or pose is not None or out is not None
    if pairs is not None and single:
        raise InputError("give either --reference/--pose/--out or --pairs/--out-dir, not both")
    if pairs is None and (reference is None or pose is None or out is None):
        raise InputError("give --reference, --pose and --out (or --pairs and --out-dir for a batch)")
    if pairs is not None and out_dir is None:
        raise InputError("--pairs needs --out-dir")
    if guidance is not None and not math.isfinite(guidance):
        raise InputError(f"--guidance must be a finite number, got {guidance}")
    interval = None if guidance_interval is None else parse_guidance_interval(guidance_interval)
    if pairs is None:
        pose = pose_argument(pose)
        check_output_path(out)
        for path, what in ((reference, "reference image"), (pose, "pose file")):
            require_file(path, what)
            if out.resolve() == path.resolve():
                raise InputError(f"{out}: --out is the {what}; choose another output (inputs are never written over)")
        lines, problems = [PairLine("", 0, reference, pose, out)], []
    else:
        check_output_folder(out_dir)
        lines, problems = read_pairs(pairs, out_dir)

    from tqdm.auto import tqdm

    from xmdpt.default_model import EMBEDDED_NOTICE, load_pipeline
    from xmdpt.generation import Job, generate_batches
    from xmdpt.inputs import PoseReader

    pipe = load_pipeline(model, device, notice=False)
    if sampler is not None:
        pipe.set_sampler(sampler.value)
    settings = pipe.sampling_settings(
        num_inference_steps=steps,
        guidance_scale=guidance,
        guidance_interval=interval,
        precision=None if dtype is None else dtype.value,
        cache=cache,
    )
    for message in problems:
        typer.echo(f"error: {message}", err=True)
    failed = len(problems)
    # One MediaPipe instance for the whole run, opened only if a driving photo appears.
    with PoseReader() as reader:
        jobs = [
            Job(line.where, seed + line.index, partial(line_inputs, line, pipe.image_size, fit.value, reader))
            for line in lines
        ]
        results = generate_batches(pipe, jobs, settings, batch_size=batch_size, progress=pairs is not None)
        for line, result in zip(lines, results, strict=True):
            message = result.error if result.error is not None else save_image(result.image, line.out)
            if message is not None and pairs is None:  # single mode: the error is the command's
                raise InputError(message)
            if message is not None:
                tqdm.write(f"error: {line.where}: {message}", file=sys.stderr)  # above the progress bar
                failed += 1
    if model is None:  # on the terminal, beside what was written (an error stays the one line of its command)
        typer.echo(f"note: {EMBEDDED_NOTICE}", err=True)
    if pairs is None:
        typer.echo(f"wrote {out} ({pipe.image_size[1]}x{pipe.image_size[0]} pixels)")
        return
    size = f"{pipe.image_size[1]}x{pipe.image_size[0]} pixels"
    typer.echo(f"wrote {len(lines) + len(problems) - failed} images ({size}) to {out_dir}; {failed} lines failed")
    if failed:
        raise typer.Exit(2)


def line_inputs(line: PairLine, size: tuple[int, int], fit: str, reader):
    """(reference, skeleton) tensors of one line; raises `InputError` for a bad one."""
    from xmdpt.inputs import is_keypoint_file, prepare_inputs

    require_file(line.pose, "pose file" if is_keypoint_file(line.pose) else "pose file or driving photo")
    return prepare_inputs(line.reference, line.pose, size, fit, reader)


def save_image(image, path: Path) -> str | None:
    """Write one generated image (3, H, W) in [-1, 1]; the reason it could not be written, or None."""
    from xmdpt.pipeline import to_pil

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        to_pil(image[None])[0].save(path)
    except OSError as err:
        return f"{path}: cannot write the image ({err.strerror or err})"
    return None
