"""`xmdpt evaluate`: generate a test set and score it under the field's protocol (FID, SSIM, LPIPS, PSNR, ...).

The work is `xmdpt.evaluation.run.evaluate`; this module only parses options. Several GPUs:
`accelerate launch -m xmdpt evaluate ...` (each process generates its share; the main process scores).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from xmdpt.cli.generate import (
    CacheOption,
    GuidanceIntervalOption,
    GuidanceOption,
    PrecisionOption,
    Sampler,
    StepsOption,
)


class EvalLayout(str, Enum):
    deepfashion = "deepfashion"
    synthetic = "synthetic"
    pidm = "pidm"
    market = "market"


def evaluate(
    data_root: Annotated[Path, typer.Option(help="The data set folder (test and training splits).")],
    out_dir: Annotated[Path, typer.Option(help="Where generated/, metrics.json, report.md and the plots go.")],
    layout: Annotated[EvalLayout, typer.Option(help="How the data set is laid out.")] = EvalLayout.deepfashion,
    model: Annotated[str | None, typer.Option(help="Pipeline folder or Hub id; default: the embedded model.")] = None,
    size: Annotated[
        str | None, typer.Option(help="Evaluation size HxW: 256x176 or 512x352; default: the data set's.")
    ] = None,
    steps: StepsOption = None,
    guidance: GuidanceOption = None,
    guidance_interval: GuidanceIntervalOption = None,
    sampler: Annotated[Sampler | None, typer.Option(help="The sampler; default: the model's.")] = None,
    seed: Annotated[
        int, typer.Option(min=0, max=2**63 - 1, help="Seed; each pair's noise comes from (seed, its file name).")
    ] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Pairs per forward pass (and per scoring batch).")] = 8,
    dtype: PrecisionOption = None,
    cache: CacheOption = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N test pairs (a smoke run).")] = None,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader workers for reading images.")] = 0,
    generated: Annotated[
        Path | None, typer.Option(help="Score this folder of generated PNGs; skip generation.")
    ] = None,
    fid: Annotated[
        bool | None, typer.Option("--fid/--no-fid", help="FID; default: on, off for the synthetic set.")
    ] = None,
    lpips: Annotated[
        bool | None, typer.Option("--lpips/--no-lpips", help="LPIPS; default: on, off for the synthetic set.")
    ] = None,
    inception_weights: Annotated[
        Path | None, typer.Option(help="Local inception_v3_google-0cc3c7bd.pth (else torch's hub cache).")
    ] = None,
    tf_inception_weights: Annotated[
        Path | None, typer.Option(help="pt_inception-2015-12-05-6726825d.pth: adds the TF-Inception FID.")
    ] = None,
    alexnet_weights: Annotated[
        Path | None, typer.Option(help="Local alexnet-owt-7be5be79.pth for LPIPS (else torch's hub cache).")
    ] = None,
    stats_cache: Annotated[
        Path | None, typer.Option(help="Folder of cached real-set FID statistics; default ~/.cache/xmdpt/fid-stats.")
    ] = None,
    real_stats: Annotated[
        Path | None, typer.Option(help="Real-set statistics file for the FID (refused if from another set/size).")
    ] = None,
    real_list: Annotated[
        Path | None, typer.Option(help="FID real set: image names, one a line (e.g. train.lst); default: all.")
    ] = None,
) -> None:
    """Evaluate a model on a test set: generate every pair, score it, write metrics.json and report.md."""
    from xmdpt.evaluation.protocol import parse_size
    from xmdpt.evaluation.run import EvalConfig
    from xmdpt.evaluation.run import evaluate as run_evaluation
    from xmdpt.settings import parse_guidance_interval

    config = EvalConfig(
        data_root=data_root,
        layout=layout.value,
        out_dir=out_dir,
        image_size=None if size is None else parse_size(size),
        model=model,
        steps=steps,
        guidance=guidance,
        guidance_interval=None if guidance_interval is None else parse_guidance_interval(guidance_interval),
        sampler=None if sampler is None else sampler.value,
        seed=seed,
        batch_size=batch_size,
        precision=None if dtype is None else dtype.value,
        cache=cache,
        limit=limit,
        workers=workers,
        generated=generated,
        fid=fid,
        lpips=lpips,
        inception_weights=inception_weights,
        tf_inception_weights=tf_inception_weights,
        alexnet_weights=alexnet_weights,
        stats_cache=stats_cache if stats_cache is not None else Path.home() / ".cache" / "xmdpt" / "fid-stats",
        real_stats=real_stats,
        real_list=real_list,
    )
    outcome = run_evaluation(config)
    if outcome is None:  # a non-main process of a distributed run: the main process reports
        return
    result = outcome.result
    values = {**result.fid, **result.means}
    typer.echo(f"{result.count} pairs at {result.image_size[0]}x{result.image_size[1]}")
    for key, value in values.items():
        typer.echo(f"{key:>10}: {value:.4f}")
    typer.echo(f"report: {outcome.files['report']}")
