"""Seconds per image of sampling, one table per model: the public code's schedule, ours, each speed lever alone and
all of them together, in the same run; with held-out quality for the trained model.

Models:
- X-MDPT-S/2 and B/2 at 256x176 (latent 32x22), random weights, conditioned on random features of DINOv2's shapes:
  the denoising loop alone is timed (encoders and VAE: `bench/pipeline.py`);
- the embedded default (trained): the whole generation of 64 held-out pairs of the demo (seeds 1 and 2, 32 pairs
  each, one batch per seed), with the demo's SSIM, PSNR, pose match and pattern match.

Rows. The baseline is 50 guided DDIM steps at every step at fp32: "public" runs it on the public code's schedule of
work (`bench/public_schedule.py`: two unbatched guidance passes per step, conditions re-encoded in each, the reference
tokens through every block), "ours" on ours, with the public respaced DDIM (`ddim-public`), so both give the same
images. Then one lever at a time on ours: bf16 autocast, DPM-Solver++ at 20 steps, guidance only on t in [200, 800],
FORA (`fora:3`), TeaCache (`teacache:0.2`), torch.compile (timed after its warm-up); and all levers but compile
together. For the embedded default the guidance scale is its own (2.5) and a last row is its shipped setting.

    python bench/sampling.py                          # all three tables, batch 1 for S/2 and B/2
    python bench/sampling.py --models S/2 --batch 8
    python bench/sampling.py --models default         # the embedded default only (about 3 minutes)
    python bench/sampling.py --tiny                   # tiny stand-ins, a few steps: seconds, for the tests
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
from pipeline import machine
from public_schedule import PublicSchedulePipeline

from xmdpt import XMDPT, XMDPT_PRESETS, XMDPTPipeline, make_sampling_scheduler, make_train_scheduler
from xmdpt.conditioning import PixelCodec
from xmdpt.pipeline import SAMPLING_DEFAULTS, sampler_name


@dataclass(frozen=True)
class Row:
    label: str
    sampler: str = "ddim-public"
    settings: dict = field(default_factory=dict)  # overrides of the baseline's sampling settings
    public: bool = False  # the public code's schedule of work
    compile: bool = False


FAST = dict(num_inference_steps=20, guidance_interval=(200.0, 800.0), precision="bf16", cache="fora:3")
ROWS = [
    Row("public schedule, fp32, DDIM 50", public=True),
    Row("ours, fp32, DDIM 50"),
    Row("bf16 autocast", settings=dict(precision="bf16")),
    Row("DPM-Solver++ 20 steps", "dpmsolver++", dict(num_inference_steps=20)),
    Row("guidance on t in [200, 800]", settings=dict(guidance_interval=(200.0, 800.0))),
    Row("FORA, fora:3", settings=dict(cache="fora:3")),
    Row("TeaCache, teacache:0.2", settings=dict(cache="teacache:0.2")),
    Row("torch.compile", compile=True),
    Row("all levers: bf16, DPM-Solver++ 20, [200, 800], fora:3", "dpmsolver++", FAST),
]


def random_pipeline(preset: str, latent: tuple[int, int], tiny: bool) -> XMDPTPipeline:
    torch.manual_seed(0)
    shrink = dict(hidden_size=32, depth=2, num_heads=2) if tiny else {}
    model = XMDPT(patch_size=2, **(XMDPT_PRESETS[preset] | shrink), sample_size=latent).eval()
    with torch.no_grad():  # adaLN-Zero starts at zero: give the blocks non-zero outputs, as trained ones have
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    scheduler = make_sampling_scheduler("ddim-public", make_train_scheduler().config)
    return XMDPTPipeline(model, PixelCodec(factor=8, channels=4), None, None, scheduler, guidance_scale=2.0)


def variant(pipe: XMDPTPipeline, row: Row) -> XMDPTPipeline:
    """The pipeline a row samples with: the same components, on the public schedule or ours, the row's sampler."""
    cls = PublicSchedulePipeline if row.public else XMDPTPipeline
    out = cls(**pipe.components, **{k: pipe.config[k] for k in SAMPLING_DEFAULTS if k in pipe.config})
    out.set_sampler(row.sampler)
    out.set_progress_bar_config(disable=True)
    if row.compile:
        out.denoiser = torch.compile(pipe.denoiser, dynamic=False)
    return out


def row_settings(pipe: XMDPTPipeline, row: Row, steps: int):
    # (0, 1000) guides every step; None would keep the model's own interval.
    base = dict(num_inference_steps=steps, guidance_interval=(0.0, 1000.0), precision="fp32", cache="none")
    overrides = base | row.settings
    if "num_inference_steps" in row.settings:  # a lever's own step count, scaled like the baseline's
        overrides["num_inference_steps"] = max(2, round(row.settings["num_inference_steps"] * steps / 50))
    return pipe.sampling_settings(**overrides)


def loop_seconds(pipe: XMDPTPipeline, row: Row, inputs: tuple, steps: int) -> float:
    """Seconds per image of the denoising loop, after a warm-up (which also compiles)."""
    p = variant(pipe, row)
    settings = row_settings(p, row, steps)
    noise = torch.randn(inputs[2].shape, generator=torch.Generator().manual_seed(2))
    dtype = {"bf16": torch.bfloat16}.get(settings.precision)

    def once() -> float:
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            public = isinstance(p, PublicSchedulePipeline)
            conditions = p.conditions_from(inputs) if public else p.denoiser.encode_conditions(*inputs)
            p.denoise(conditions, settings, noise, progress=False)
        return time.perf_counter() - start

    once()  # warm-up: allocator, oneDNN kernels, torch.compile's graphs
    return min(once() for _ in range(2 if row.compile else 1)) / noise.shape[0]


def random_inputs(batch: int, latent: tuple[int, int]) -> tuple:
    g = torch.Generator().manual_seed(1)
    features = (torch.randn(batch, 257, 768, generator=g), torch.randn(batch, 257, 1536, generator=g))
    return (*features, torch.randn(batch, 4, *latent, generator=g), None)


def embedded_row(pipe: XMDPTPipeline, row: Row, synth, steps: int, pairs: int, seeds: list[int]) -> dict:
    from xmdpt.demo import run_demo

    p = variant(pipe, row)
    if row.label.startswith("shipped"):
        settings = p.sampling_settings()
    else:
        settings = row_settings(p, row, steps)
    run_demo(p, synth, settings, num_pairs=2, seed=0, progress=False)  # warm-up
    elapsed, generate = [], p.generate  # the demo's drawing and scoring of the pairs are not timed

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        elapsed.append(time.perf_counter() - start)
        return out

    p.generate = timed_generate
    results = [run_demo(p, synth, settings, num_pairs=pairs, seed=s, progress=False) for s in seeds]
    n = pairs * len(seeds)
    return dict(
        seconds=sum(elapsed) / n,
        ssim=" / ".join(f"{r.model.ssim.mean():.3f}" for r in results),
        psnr=sum(r.model.psnr.mean() for r in results) / len(results),
        pose=f"{sum(int(r.model.pose_match.sum()) for r in results)}/{n}",
        pattern=f"{sum(int(r.model.pattern_match.sum()) for r in results)}/{n}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["S/2", "B/2", "default"])
    parser.add_argument("--batch", type=int, default=1, help="images per loop for S/2 and B/2")
    parser.add_argument("--steps", type=int, default=50, help="the baseline's DDIM steps (levers' steps scale)")
    parser.add_argument("--pairs", type=int, default=32, help="held-out pairs per demo seed (embedded default)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="demo seeds (embedded default)")
    parser.add_argument("--skip", nargs="*", default=[], help="rows to leave out, by a word of their label")
    parser.add_argument("--tiny", action="store_true", help="tiny stand-ins, 4 steps, 4 pairs (for the tests)")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.pairs, args.seeds = 4, 4, [1]
    rows = [r for r in ROWS if not any(word in r.label for word in args.skip)]
    print(f"# {machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    start = time.perf_counter()
    for name in args.models:
        if name == "default":
            from xmdpt.default_model import default_model_path, load_pipeline, synthetic_set

            pipe = load_pipeline(None, "cpu", notice=False)
            synth = synthetic_set(default_model_path())
            scale = pipe.config["guidance_scale"]
            print(f"\n## embedded default, {pipe.image_size[0]}x{pipe.image_size[1]}, guidance {scale}")
            print(f"# {args.pairs} held-out pairs on each of demo seeds {args.seeds}; s/image of the whole generation")
            print("| setting | s/image | speed-up | SSIM per seed | PSNR dB | pose match | pattern match |")
            print("|---|---|---|---|---|---|---|")
            table = rows + [Row("shipped default: " + describe(pipe), sampler=sampler_name(pipe.scheduler))]
            baseline = None
            for row in table:
                r = embedded_row(pipe, row, synth, args.steps, args.pairs, args.seeds)
                baseline = baseline or r["seconds"]
                print(
                    f"| {row.label} | {r['seconds']:.3f} | {baseline / r['seconds']:.1f}x | {r['ssim']} | "
                    f"{r['psnr']:.2f} | {r['pose']} | {r['pattern']} |",
                    flush=True,
                )
            continue
        latent = (32, 22)
        pipe = random_pipeline(name, latent, args.tiny)
        inputs = random_inputs(args.batch, latent)
        print(f"\n## X-MDPT-{name}, 256x176 (latent 32x22), batch {args.batch}, guidance 2.0, random weights")
        print("| setting | s/image | speed-up |")
        print("|---|---|---|")
        baseline = None
        for row in rows:
            seconds = loop_seconds(pipe, row, inputs, args.steps)
            baseline = baseline or seconds
            print(f"| {row.label} | {seconds:.3f} | {baseline / seconds:.1f}x |", flush=True)
    print(f"\n# wall time {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.1f}")


def describe(pipe: XMDPTPipeline) -> str:
    s = pipe.sampling_settings()
    interval = (
        "every step" if s.guidance_interval is None else f"[{s.guidance_interval[0]:g}, {s.guidance_interval[1]:g}]"
    )
    extra = ", ".join(v for v in (s.precision, s.cache if s.cache != "none" else "") if v)
    return f"{s.sampler} {s.num_inference_steps}, {interval}, {extra}"


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
