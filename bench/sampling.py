"""Seconds per image of X-MDPT-S sampling: our schedule of work against the public code's, in the same run.

Both run the same model (random weights), the same 50 DDIM steps with guidance 2.0 and the same noise; the public
schedule runs two unbatched guidance passes per step and pushes the reference tokens through every block (reference
Sec. 6). Encoders and the VAE run once per image in both and are left out (random features of DINOv2's shapes).

    python bench/sampling.py                  # 256x176 (latent 32x22), batch 1 and 8, fp32
    python bench/sampling.py --steps 10 --batch 1 --dtype bf16
    python bench/sampling.py --guidance-interval 200 800   # also ours guided only at t in [200, 800]

With `--guidance-interval`, a third column times our schedule guided only inside the interval (one conditional pass
at the other steps; a different sampler output by design, so no diff is printed for it) and its speed-up over ours
guided at every step.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from public_schedule import PublicSchedulePipeline

from xmdpt import XMDPTPipeline, make_sampling_scheduler, make_train_scheduler, xmdpt_from_preset
from xmdpt.conditioning import PixelCodec


def build(latent: tuple[int, int], preset: str) -> tuple[XMDPTPipeline, PublicSchedulePipeline]:
    torch.manual_seed(0)
    model = xmdpt_from_preset(preset, sample_size=latent).eval()
    with torch.no_grad():  # non-zero outputs, so that "identical outputs" means something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    scheduler = make_sampling_scheduler("ddim", make_train_scheduler().config)
    # Only the denoising loop is timed: the codec and encoders are placeholders.
    components = (model, PixelCodec(factor=8, channels=4), None, None, scheduler)
    return XMDPTPipeline(*components), PublicSchedulePipeline(*components)


def inputs(batch: int, latent: tuple[int, int]) -> tuple:
    """Random encoder features of DINOv2's shapes and a reference latent: `XMDPT.encode_conditions`' arguments."""
    g = torch.Generator().manual_seed(1)
    features = (torch.randn(batch, 257, 768, generator=g), torch.randn(batch, 257, 1536, generator=g))
    return (*features, torch.randn(batch, 4, *latent, generator=g), None)


def run(pipe, args, steps, dtype, interval=None) -> tuple[float, torch.Tensor]:
    noise = torch.randn(args[2].shape, generator=torch.Generator().manual_seed(2))
    settings = pipe.sampling_settings(num_inference_steps=steps, guidance_scale=2.0, guidance_interval=interval)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        public = isinstance(pipe, PublicSchedulePipeline)
        conditions = pipe.conditions_from(args) if public else pipe.denoiser.encode_conditions(*args)
        out = pipe.denoise(conditions, settings, noise, progress=False)
    return time.perf_counter() - start, out.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="S/2")
    parser.add_argument("--latent", default="32x22", help="latent HxW (32x22 = 256x176 images)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"))
    args = parser.parse_args()
    interval = args.guidance_interval
    latent = tuple(int(v) for v in args.latent.split("x"))
    ours, public = build(latent, args.preset)
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"# X-MDPT-{args.preset}, latent {latent[0]}x{latent[1]}, {args.steps} DDIM steps, CFG 2.0, {args.dtype}")
    extra = " ours on the interval s/image | interval speed-up |" if interval else ""
    print(f"| batch | public s/image | ours s/image | speed-up | max abs diff |{extra}")
    print("|---|---|---|---|---|" + ("---|---|" if interval else ""))
    for batch in args.batch:
        args_ = inputs(batch, latent)
        run(ours, tuple(None if v is None else v[:1] for v in args_), 2, args.dtype)  # warm-up
        t_public, out_public = run(public, args_, args.steps, args.dtype)
        t_ours, out_ours = run(ours, args_, args.steps, args.dtype)
        diff = (out_public - out_ours).abs().max().item()
        row = f"| {batch} | {t_public / batch:.2f} | {t_ours / batch:.2f} | {t_public / t_ours:.2f}x | {diff:.1e} |"
        if interval:
            t_interval, _ = run(ours, args_, args.steps, args.dtype, tuple(interval))
            row += f" {t_interval / batch:.2f} | {t_ours / t_interval:.2f}x |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
