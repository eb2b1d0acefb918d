"""`xmdpt demo`: the embedded default model on held-out synthetic identities, against the ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xmdpt.cli.generate import CacheOption, PrecisionOption
from xmdpt.errors import InputError


def demo(
    model: Annotated[
        str | None, typer.Option(help="Pipeline folder with xmdpt_default.json; default: the embedded model.")
    ] = None,
    num_pairs: Annotated[int, typer.Option(min=1, max=256, help="Held-out pairs to generate.")] = 8,
    steps: Annotated[int | None, typer.Option(min=1, max=1000, help="Sampling steps; default: the model's.")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="Seed of the pair choice and of the sampler.")] = 0,
    out: Annotated[Path, typer.Option(help="The grid image to write.")] = Path("xmdpt-demo.png"),
    dtype: PrecisionOption = None,
    cache: CacheOption = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda...; default: cuda if present.")] = None,
) -> None:
    """Re-pose held-out synthetic people; write a grid (reference | target pose | generated | ground truth) and
    print SSIM, PSNR and the pose and pattern matches, and those of copying the reference image unchanged."""
    from xmdpt.cli.generate import check_output_path
    from xmdpt.default_model import INFO_FILE, default_model_path, load_pipeline, synthetic_set
    from xmdpt.demo import run_demo

    check_output_path(out)
    synth = synthetic_set(default_model_path() if model is None else model)
    if synth is None:
        raise InputError(f"{model}: no {INFO_FILE} with the synthetic set it was trained on; the demo needs one")
    pipe = load_pipeline(model, device, notice=False)  # the demo shows exactly what it was trained on
    precision = None if dtype is None else dtype.value
    settings = pipe.sampling_settings(num_inference_steps=steps, precision=precision, cache=cache)
    result = run_demo(pipe, synth, settings, num_pairs=num_pairs, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.grid.save(out)
    typer.echo(f"{'SSIM':>6} {'PSNR':>8}  held-out pair (reference -> target)")
    for pair, ssim, psnr in zip(result.pairs, result.model.ssim, result.model.psnr, strict=True):
        typer.echo(f"{ssim:6.3f} {psnr:5.2f} dB  {pair.reference_name} -> {pair.target_name}")
    for name, scores in (("generated", result.model), ("copy the reference (baseline)", result.copy_reference)):
        n = len(scores.pose_match)
        match = f"  pose match {int(scores.pose_match.sum())}/{n}  pattern match {int(scores.pattern_match.sum())}/{n}"
        typer.echo(f"{name:<30} SSIM {scores.ssim.mean():.3f}  PSNR {scores.psnr.mean():.2f} dB{match}")
    typer.echo(f"wrote {out} ({len(result.pairs)} held-out pairs, {result.seconds:.1f} s)")
