"""Where the time of one real image goes: seconds per stage of the full pipeline at real scale, fp32 and bf16.

Builds the full-size architectures from their configs with random weights (nothing is downloaded):
- X-MDPT-S/2 and B/2 at 256x176 (latent 32x22), conditioned on 257 tokens of widths 768 (pose) and 1536 (reference);
- DINOv2-b on the rendered skeleton and DINOv2-g on the reference, with the published `facebook/dinov2-base` and
  `facebook/dinov2-giant` configs (ViT-B/14: width 768, 12 layers, 12 heads, MLP 3072; ViT-g/14: width 1536, 40
  layers, 24 heads, SwiGLU FFN of 4096), wrapped as `DinoV2Encoder` exactly as `DinoV2Encoder.from_dinov2` wraps
  them (position table resampled to 16x16, input resized to 224: 257 tokens; the public code's input quirks);
- the SD-VAE (`stabilityai/sd-vae-ft-mse`'s `AutoencoderKL` config: 4 blocks of 128, 256, 512, 512 channels,
  2 layers each, 4 latent channels, 8x downsampling), wrapped as `VAECodec`.

For one image it times each stage with the pipeline's own pieces (`XMDPTPipeline`'s components, `encode_inputs`,
`denoiser.encode_conditions`, `denoise`, `codec.decode`), in fp32 and under `torch.autocast(..., torch.bfloat16)`:
the pose encoder, the reference encoder, the VAE encode of the reference, the denoiser's per-image conditions, the
denoising loop (the published setting: 50 DDIM steps with guidance 2.0 at every step, on the public respaced DDIM
that `xmdpt convert` writes; and the embedded default's fast setting: DPM-Solver++ 25 steps, guidance 2.5 on t in
[200, 800]), the VAE decode, and the totals. Each stage is
warmed up once; encoder and VAE stages report the median of `--repeats` runs, the loops one run.

    python bench/pipeline.py                                  # S/2 and B/2, fp32 and bf16, 50 + 25 steps
    python bench/pipeline.py --models S/2 --dtype bf16
    python bench/pipeline.py --steps 10                       # run 10 DDIM steps, report them scaled to 50
    python bench/pipeline.py --quick                          # smoke run at full size: 4 + 5 steps, scaled
    python bench/pipeline.py --tiny                           # tiny widths and depths, 2 steps: seconds, for tests

With fewer steps than the setting's (`--steps`, `--fast-steps`, `--quick`) a loop's time is scaled linearly to the
setting's step count and the row says so. That is exact for DDIM guided at every step (every step costs the same) and
approximate for the guidance interval (the share of guided steps changes with the step count).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import time

import torch
from public_schedule import PublicSchedulePipeline

from xmdpt import (
    XMDPT,
    XMDPT_PRESETS,
    DinoV2Encoder,
    VAECodec,
    XMDPTPipeline,
    make_sampling_scheduler,
    make_train_scheduler,
    xmdpt_from_preset,
)

IMAGE = (256, 176)  # H, W: the published models' 256x176 crop; latent 32x22
DINO_INPUT = 224  # the encoders resize to 224: a 16x16 patch grid + cls = 257 tokens

# facebook/dinov2-base and facebook/dinov2-giant's config.json (the architecture fields).
DINOV2_BASE = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, use_swiglu_ffn=False,
    image_size=518, patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
)  # fmt: skip
DINOV2_GIANT = DINOV2_BASE | dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True)

# stabilityai/sd-vae-ft-mse's config.json.
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=256,
)  # fmt: skip

# The two sampling settings: (label, sampler, steps, guidance scale, guidance interval).
PUBLISHED = ("DDIM 50, guided every step", "ddim-public", 50, 2.0, None)
FAST = ("DPM-Solver++ 25, guided on [200, 800]", "dpmsolver++", 25, 2.5, (200.0, 800.0))


def dinov2_from_config(config: dict, input_transform: str, image_size: int = DINO_INPUT) -> DinoV2Encoder:
    """What `DinoV2Encoder.from_dinov2` builds from a Hub folder with this config, with random weights: the position
    table resampled to the `image_size` input (so the config's image size becomes it), the public code's quirks
    (no antialiasing)."""
    grid = image_size // config["patch_size"]
    config = config | dict(image_size=grid * config["patch_size"])
    return DinoV2Encoder(
        dinov2_config=config, image_size=image_size, input_transform=input_transform, antialias=False
    ).eval()


def build(models: list[str], tiny: bool) -> tuple[dict[str, XMDPTPipeline], tuple[int, int]]:
    """One pipeline per denoiser, all sharing the same encoders and VAE."""
    torch.manual_seed(0)
    if tiny:
        dino_pose = DINOV2_BASE | dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
        dino_ref = DINOV2_GIANT | dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=2)
        vae = SD_VAE | dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64)
        image, dino_input = (64, 48), 28
        denoiser_kwargs = dict(hidden_size=32, depth=2, num_heads=2)
    else:
        dino_pose, dino_ref, vae, image, dino_input = DINOV2_BASE, DINOV2_GIANT, SD_VAE, IMAGE, DINO_INPUT
        denoiser_kwargs = {}
    pose_encoder = dinov2_from_config(dino_pose, "unit", dino_input)
    reference_encoder = dinov2_from_config(dino_ref, "signed", dino_input)
    codec = VAECodec(vae_config=dict(vae)).eval()
    latent = (image[0] // codec.downsample_factor, image[1] // codec.downsample_factor)
    pipes = {}
    for name in models:
        shapes = dict(
            sample_size=latent,
            pose_feature_dim=pose_encoder.feature_dim,
            pose_num_tokens=pose_encoder.num_tokens,
            reference_feature_dim=reference_encoder.feature_dim,
            reference_num_tokens=reference_encoder.num_tokens,
        )
        if tiny:  # the preset's shape, shrunk
            denoiser = XMDPT(patch_size=2, **(XMDPT_PRESETS[name] | denoiser_kwargs | shapes))
        else:
            denoiser = xmdpt_from_preset(name, **shapes)
        denoiser.eval()
        with torch.no_grad():  # adaLN-Zero starts at zero: give the blocks non-zero outputs, as trained ones have
            for p in denoiser.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        scheduler = make_sampling_scheduler("ddim", make_train_scheduler().config)
        pipes[name] = XMDPTPipeline(denoiser, codec, pose_encoder, reference_encoder, scheduler)
    return pipes, image


def precision(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def timed(fn, dtype: str, repeats: int, warm: bool = True) -> tuple[float, object]:
    """Median seconds of `repeats` calls of `fn` under the precision (after one warm-up call), and the last result."""
    with torch.no_grad(), precision(dtype):
        if warm:
            fn()
        times, out = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times), out


def time_loop(pipe: XMDPTPipeline, conditions, noise, setting, run_steps: int | None, dtype: str) -> tuple:
    """Seconds of one denoising loop at `setting` (one run, after a 2-step warm-up with the same sampler); run with
    `run_steps` steps when given and scaled to the setting's count."""
    label, sampler, steps, scale, interval = setting
    pipe.set_sampler(sampler)
    run = min(run_steps or steps, steps)
    settings = pipe.sampling_settings(num_inference_steps=run, guidance_scale=scale, guidance_interval=interval)
    warm = pipe.sampling_settings(num_inference_steps=2, guidance_scale=scale, guidance_interval=interval)
    with torch.no_grad(), precision(dtype):
        pipe.denoise(conditions, warm, noise, progress=False)
        start = time.perf_counter()
        latents = pipe.denoise(conditions, settings, noise, progress=False)
        seconds = time.perf_counter() - start
    note = "" if run == steps else f" ({run} steps run, scaled)"
    return seconds * steps / run, label + note, latents


def end_to_end(pipe: XMDPTPipeline, image: tuple[int, int], steps: int, fast_steps: int, cache: str) -> list:
    """Seconds per image from the reference photo and the rendered pose to the decoded image, `generate` as every
    front end calls it: the public code's schedule at fp32 (its 50-step loop, the encoders and the VAE for every
    image), ours with the same sampling, and the fast setting, for a new reference and for a further pose of the
    same reference (whose encodings the pipeline holds). Each row after a warm-up call."""
    public = PublicSchedulePipeline(**pipe.components, guidance_scale=2.0)
    g = torch.Generator().manual_seed(3)
    reference = torch.rand(1, 3, *image, generator=g) * 2 - 1
    poses = [torch.rand(1, 3, *image, generator=g) for _ in range(3)]
    noise = torch.randn(1, pipe.denoiser.config.in_channels, *pipe.denoiser.config.sample_size, generator=g)
    published = dict(num_inference_steps=steps, guidance_scale=2.0, guidance_interval=(0.0, 1000.0), precision="fp32")
    fast = dict(num_inference_steps=fast_steps, guidance_scale=2.0, guidance_interval=(200.0, 800.0))
    fast |= dict(precision="auto", cache=cache)
    rows = []
    for label, p, sampler, overrides, new_reference in (
        (f"public schedule, fp32, DDIM {steps} guided every step", public, "ddim-public", published, True),
        ("ours, fp32, the same sampling", pipe, "ddim-public", published, True),
        (
            f"ours, fast: auto precision, DPM-Solver++ {fast_steps}, [200, 800], {cache}",
            pipe,
            "dpmsolver++",
            fast,
            True,
        ),
        ("ours, fast, a further pose of the same reference", pipe, "dpmsolver++", fast, False),
    ):
        p.set_sampler(sampler)
        settings = p.sampling_settings(**overrides)
        p.reference_encodings.clear()
        p.generate(reference, poses[0], settings, noise)  # warm-up; holds the reference's encodings
        if new_reference:
            p.reference_encodings.clear()
        start = time.perf_counter()
        p.generate(reference, poses[len(rows) % 2 + 1], settings, noise)
        rows.append((label, settings.precision, time.perf_counter() - start))
    pipe.set_sampler("ddim")
    return rows


def stage_table(pipes: dict[str, XMDPTPipeline], image: tuple[int, int], args, steps, fast_steps, repeats) -> None:
    """Seconds of each stage of one image, per precision, and the totals."""
    pipe = next(iter(pipes.values()))
    g = torch.Generator().manual_seed(1)
    reference = torch.rand(1, 3, *image, generator=g) * 2 - 1  # (1, 3, H, W) in [-1, 1]
    pose = torch.rand(1, 3, *image, generator=g)  # (1, 3, H, W) in [0, 1]: the rendered skeleton
    noise = torch.randn(1, pipe.denoiser.config.in_channels, *pipe.denoiser.config.sample_size, generator=g)

    rows: dict[str, dict[str, float]] = {}  # stage -> dtype -> seconds
    labels: dict[str, str] = {}

    def record(key: str, label: str, dtype: str, seconds: float) -> None:
        labels.setdefault(key, label)
        rows.setdefault(key, {})[dtype] = seconds
        print(f"  {dtype} {labels[key]}: {seconds:.2f} s", flush=True)

    for dtype in args.dtype:
        # The three encoders, each alone (the pipeline's components, as `encode_inputs` calls them) ...
        t, _ = timed(lambda: pipe.pose_encoder(pose), dtype, repeats)
        record("pose", "pose encoder: DINOv2-b on the skeleton", dtype, t)
        t, _ = timed(lambda: pipe.reference_encoder((reference + 1) / 2), dtype, repeats)
        record("reference", "reference encoder: DINOv2-g on the reference", dtype, t)
        t, _ = timed(lambda: pipe.codec.encode(reference), dtype, repeats)
        record("vae_encode", "VAE encode of the reference", dtype, t)
        # ... and together, once, through the pipeline (a check that the three rows add up).
        t, inputs = timed(lambda: pipe.encode_inputs(reference, pose), dtype, 1, warm=False)
        record("encode_inputs", "(check: `encode_inputs`, the three above in one call)", dtype, t)
        for name, p in pipes.items():
            t, conditions = timed(lambda p=p, x=inputs: p.denoiser.encode_conditions(*x), dtype, repeats)
            record(f"{name} conditions", f"X-MDPT-{name} conditions (aggregation network, once per image)", dtype, t)
            for key, setting, run in (("published", PUBLISHED, steps), ("fast", FAST, fast_steps)):
                t, label, latents = time_loop(p, conditions, noise, setting, run, dtype)
                record(f"{name} {key}", f"X-MDPT-{name} loop: {label}", dtype, t)
        t, _ = timed(lambda z=latents: pipe.codec.decode(z), dtype, repeats)
        record("vae_decode", "VAE decode", dtype, t)

    for name in pipes:
        for key, setting in (("published", PUBLISHED), ("fast", FAST)):
            stages = ["pose", "reference", "vae_encode", f"{name} conditions", f"{name} {key}", "vae_decode"]
            labels[f"total {name} {key}"] = f"**total, X-MDPT-{name}, {setting[0]}**"
            rows[f"total {name} {key}"] = {d: sum(rows[s][d] for s in stages) for d in args.dtype}

    print()
    print("| stage | " + " | ".join(f"{d} s" for d in args.dtype) + " |")
    print("|---|" + "---|" * len(args.dtype))
    order = ["pose", "reference", "vae_encode", "encode_inputs"]
    order += [f"{n} {k}" for n in pipes for k in ("conditions", "published", "fast")]
    order += ["vae_decode"] + [f"total {n} {k}" for n in pipes for k in ("published", "fast")]
    for key in order:
        print(f"| {labels[key]} | " + " | ".join(f"{rows[key][d]:.2f}" for d in args.dtype) + " |")
    last = args.dtype[-1]
    for name in pipes:
        stages = ["pose", "reference", "vae_encode", f"{name} conditions", f"{name} fast", "vae_decode"]
        slowest = max(stages, key=lambda s: rows[s][last])
        share = rows[slowest][last] / rows[f"total {name} fast"][last]
        print(f"# {last}, X-MDPT-{name}, fast setting: slowest stage {labels[slowest]}, {share:.0%} of the total")


def machine() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    amx = sorted(f for f in flags if f.startswith("amx"))
    bf16 = "avx512_bf16" if "avx512_bf16" in flags else "no avx512_bf16"
    return (
        f"{name}; AMX: {'yes (' + ', '.join(amx) + ')' if amx else 'no'}; {bf16}; "
        f"{torch.get_num_threads()} torch threads; torch {torch.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["S/2", "B/2"], help="X-MDPT presets")
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, help="DDIM steps to run for the published loop (scaled to 50)")
    parser.add_argument("--fast-steps", type=int, help="DPM-Solver++ steps to run for the fast loop (scaled to 25)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each encoder / VAE stage (median)")
    parser.add_argument("--quick", action="store_true", help="smoke run at full size: 4 + 5 steps, 1 repeat")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and depths, 2 steps (seconds; for tests)")
    parser.add_argument(
        "--end-to-end",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time `generate` end to end for the first model (public, ours, fast)",
    )
    parser.add_argument("--stages", action=argparse.BooleanOptionalAction, default=True, help="the stage table")
    parser.add_argument("--cache", default="fora:3", help="the fast setting's feature cache")
    args = parser.parse_args()
    steps, fast_steps, repeats = args.steps, args.fast_steps, args.repeats
    if args.quick:
        steps, fast_steps, repeats = steps or 4, fast_steps or 5, 1
    if args.tiny:
        steps, fast_steps, repeats = 2, 2, 1

    start = time.perf_counter()
    pipes, image = build(args.models, args.tiny)
    print(f"# {machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    scale = "tiny stand-ins (--tiny)" if args.tiny else "full size, random weights"
    print(f"# one image at {image[0]}x{image[1]}, {scale}; built in {time.perf_counter() - start:.0f} s", flush=True)

    if args.stages:
        stage_table(pipes, image, args, steps, fast_steps, repeats)
    if args.end_to_end:
        name = args.models[0]
        steps_e2e, fast_e2e = (2, 2) if args.tiny else (50, 20)
        print(f"\n## end to end, X-MDPT-{name}, one image: photo and pose in, decoded image out (`generate`)")
        print("| path | precision | s/image | speed-up |")
        print("|---|---|---|---|")
        rows_e2e = end_to_end(pipes[name], image, steps_e2e, fast_e2e, args.cache)
        for label, used, seconds in rows_e2e:
            print(f"| {label} | {used} | {seconds:.2f} | {rows_e2e[0][2] / seconds:.1f}x |", flush=True)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"# wall time {time.perf_counter() - start:.0f} s; load average at the end {load}")


if __name__ == "__main__":
    main()
