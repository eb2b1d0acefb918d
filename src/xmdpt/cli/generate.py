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
from pathlib import Path
from typing import Annotated

import typer

from xmdpt.errors import InputError, require_file

log = logging.getLogger(__name__)
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


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
        name = cells[2] if len(cells) > 2 and cells[2] else f"{number:04d}-{reference.stem}-{pose.stem}.png"
        out = Path(name)
        if out.is_absolute() or ".." in out.parts:
            problems.append(f"{where}: out {name!r} must be a relative path inside --out-dir")
        elif out.suffix.lower() not in OUTPUT_SUFFIXES:
            problems.append(f"{where}: out {name!r} must be an image file ({', '.join(OUTPUT_SUFFIXES)})")
        elif out in outs:
            problems.append(f"{where}: out {name!r} is already line {outs[out]}'s output")
        elif (out_dir / out).is_dir():
            problems.append(f"{where}: out {name!r} is a folder in --out-dir")
        else:
            outs[out] = number
            lines.append(PairLine(where, index, reference, pose, out_dir / out))
        index += 1
    return lines, problems


def parse_guidance_interval(text: str | None) -> tuple[float, float] | str | None:
    """--guidance-interval: "LO,HI" -> (lo, hi), "all" -> "all" (guide at every step), None -> None (the model's)."""
    from xmdpt.guidance import check_guidance_interval

    if text is None or text.strip().lower() == "all":
        return None if text is None else "all"
    parts = text.split(",")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 2:
        raise InputError(f"--guidance-interval {text!r}: give two timesteps LO,HI (e.g. 200,800) or 'all'")
    try:
        return check_guidance_interval(values)
    except InputError as err:
        raise InputError(f"--guidance-interval {text!r}: {err}") from None


def generate(
    reference: Annotated[Path | None, typer.Option(help="Photo of the person (single mode).")] = None,
    pose: Annotated[
        Path | None, typer.Option(help="Target pose: keypoint file (.json ours, .txt PIDM) or a driving photo.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output image (single mode).")] = None,
    pairs: Annotated[Path | None, typer.Option(help="Batch mode: CSV with header reference,pose[,out].")] = None,
    out_dir: Annotated[Path | None, typer.Option(help="Batch mode: folder for the images.")] = None,
    model: Annotated[str | None, typer.Option(help="Pipeline folder or Hub id; default: the embedded model.")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps; default: the model's (else 50).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale; default: the model's (else 2.0).")] = None,
    guidance_interval: Annotated[
        str | None,
        typer.Option(help="Guide only at timesteps LO,HI (e.g. 200,800), or 'all'; default: the model's (else all)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed (batch line i uses seed + i).")] = 0,
    sampler: Annotated[str | None, typer.Option(help="ddim, dpmsolver++ or ddpm; default: the model's.")] = None,
    fit: Annotated[str, typer.Option(help="Bring photos to the model's frame: pad, crop or stretch.")] = "pad",
    batch_size: Annotated[int, typer.Option(help="Batch mode: pairs per forward pass.")] = 4,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1...; default: cuda if present.")] = None,
) -> None:
    """Generate the reference person in the target pose: --reference --pose --out, or --pairs --out-dir."""
    from xmdpt.inputs import FITS
    from xmdpt.pipeline import SAMPLERS

    single = reference is not None or pose is not None or out is not None
    if pairs is not None and single:
        raise InputError("give either --reference/--pose/--out or --pairs/--out-dir, not both")
    if pairs is None and (reference is None or pose is None or out is None):
        raise InputError("give --reference, --pose and --out (or --pairs and --out-dir for a batch)")
    if pairs is not None and out_dir is None:
        raise InputError("--pairs needs --out-dir")
    if sampler is not None and sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if fit not in FITS:
        raise InputError(f"unknown fit {fit!r}; use {', '.join(FITS)}")
    if steps is not None and steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    if guidance is not None and not math.isfinite(guidance):
        raise InputError(f"--guidance must be a finite number, got {guidance}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    interval = parse_guidance_interval(guidance_interval)
    if pairs is None:
        check_output_path(out)
        for path, what in ((reference, "reference image"), (pose, "pose file")):
            require_file(path, what)
        lines, problems = [PairLine("", 0, reference, pose, out)], []
    else:
        check_output_folder(out_dir)
        lines, problems = read_pairs(pairs, out_dir)

    runner = Runner.load(model, device, sampler, steps, guidance, interval, seed, fit)
    if pairs is None:
        runner.run([lines[0]], progress=True)
        typer.echo(f"wrote {out}")
        return
    for message in problems:
        typer.echo(f"error: {message}", err=True)
    failed = len(problems) + runner.run_batches(lines, batch_size)
    typer.echo(f"wrote {len(lines) + len(problems) - failed} images to {out_dir}; {failed} lines failed")
    if failed:
        raise typer.Exit(2)


@dataclass
class Runner:
    """A loaded pipeline and the sampling settings of one command."""

    pipe: object
    steps: int
    guidance: float
    guidance_interval: tuple[float, float] | None
    seed: int
    fit: str

    @classmethod
    def load(cls, model, device, sampler, steps, guidance, guidance_interval, seed, fit) -> Runner:
        """`guidance_interval`: from `parse_guidance_interval`; None takes the model's."""
        from xmdpt.default_model import load_pipeline

        pipe, info = load_pipeline(model, device)
        if sampler is not None:
            pipe.set_sampler(sampler)
        steps = info.num_inference_steps if steps is None else steps
        guidance = info.guidance_scale if guidance is None else guidance
        if guidance_interval is None:
            guidance_interval = info.guidance_interval
        elif guidance_interval == "all":
            guidance_interval = None
        return cls(pipe, steps, guidance, guidance_interval, seed, fit)

    def prepare(self, line: PairLine, reader):
        """(reference, skeleton) tensors of one line; raises `InputError` for a bad one."""
        from xmdpt.inputs import is_keypoint_file, prepare_inputs

        require_file(line.pose, "pose file" if is_keypoint_file(line.pose) else "pose file or driving photo")
        return prepare_inputs(line.reference, line.pose, self.pipe.image_size, self.fit, reader)

    def sample(self, lines: list[PairLine], references, poses, progress: bool) -> list[str]:
        """Sample one batch; each line's initial noise comes from its own seed, so batching changes nothing. Return
        one message per image that could not be written (single mode raises instead)."""
        import torch

        latents, _ = self.pipe.seeded_latents([self.seed + ln.index for ln in lines])
        images = self.pipe(
            torch.cat(references),
            torch.cat(poses),
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            generator=torch.Generator().manual_seed(self.seed + lines[0].index),
            latents=latents,
            progress=progress,
            guidance_interval=self.guidance_interval,
        ).images
        failures = []
        for line, image in zip(lines, images, strict=True):
            try:
                line.out.parent.mkdir(parents=True, exist_ok=True)
                image.save(line.out)
            except OSError as err:
                if not line.where:
                    raise InputError(f"{line.out}: cannot write the image ({err.strerror or err})") from None
                failures.append(f"{line.where}: cannot write {line.out} ({err.strerror or err})")
        return failures

    def run(self, lines: list[PairLine], progress: bool, reader=None) -> list[str]:
        """Prepare and sample `lines` as one batch; return one message per line that failed (and was left out)."""
        prepared, failures = [], []
        for line in lines:
            try:
                prepared.append((line, *self.prepare(line, reader)))
            except InputError as err:
                if not line.where:  # single mode: the error is the command's
                    raise
                failures.append(f"{line.where}: {err}")
        if prepared:
            good, references, poses = (list(column) for column in zip(*prepared, strict=True))
            failures += self.sample(good, references, poses, progress)
        return failures

    def run_batches(self, lines: list[PairLine], batch_size: int) -> int:
        """Batch mode over all lines with a progress bar; bad lines are reported and counted."""
        from tqdm.auto import tqdm

        from xmdpt.inputs import PoseReader

        failed = 0
        # One MediaPipe instance for the whole file, opened only if a driving photo appears.
        with PoseReader() as reader, tqdm(total=len(lines), desc="generate", unit="image") as bar:
            for start in range(0, len(lines), batch_size):
                batch = lines[start : start + batch_size]
                for message in self.run(batch, progress=False, reader=reader):
                    bar.write(f"error: {message}", file=sys.stderr)
                    failed += 1
                bar.update(len(batch))
        return failed
