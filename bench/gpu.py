"""The GPU figures, in one run of at most 8 minutes on one CUDA GPU: sampling throughput and training throughput.

1. Sampling, X-MDPT-B/2 at 256x176 in bf16, at batch 1, 16 and 64: images/s and peak memory of
   - the denoising loop alone (conditions from the encoders' outputs), and
   - `generate` end to end (DINOv2-b on the pose, DINOv2-g and the SD-VAE encoder on the reference, the loop, the
     SD-VAE decoder),
   for the published sampling (50 DDIM steps, guidance 2.0 at every step) and the fast setting (DPM-Solver++ 20,
   guidance on [200, 800], FORA fora:3).
2. Training, S/2 and B/2 at 256x176, batch 32 with the masked pass: samples/s and peak memory of the paper's recipe
   and of each speed-up of `bench/training.py` (token routing, REPA, self-alignment, bf16 autocast, all together,
   SPRINT), each in its own process, with its `speed-up` against the paper's recipe.

Everything is built from its config with random weights (`bench/pipeline.py`'s DINOv2 and SD-VAE configs), so nothing
is downloaded.

    python bench/gpu.py                  # on a CUDA GPU
    python bench/gpu.py --part sampling
    python bench/gpu.py --tiny           # tiny stand-ins on the CPU, a few seconds: for the tests
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from pipeline import build, machine
from training import ADDITIONS, run_one

FAST = dict(num_inference_steps=20, guidance_interval=(200.0, 800.0), cache="fora:3")
PUBLISHED = dict(num_inference_steps=50, guidance_interval=(0.0, 1000.0), cache="none")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def sampling(tiny: bool, batches: list[int], device: torch.device) -> list[str]:
    pipes, image = build(["B/2"], tiny)
    pipe = pipes["B/2"].to(device)
    pipe.set_progress_bar_config(disable=True)
    lines = [
        f"## sampling, X-MDPT-B/2 at {image[0]}x{image[1]}, bf16, random weights",
        "| setting | batch | loop images/s | loop peak MiB | end to end images/s | end to end peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for label, sampler, overrides in (
        ("DDIM 50, guided every step", "ddim-public", PUBLISHED),
        ("DPM-Solver++ 20, [200, 800], fora:3", "dpmsolver++", FAST),
    ):
        pipe.set_sampler(sampler)
        steps = 2 if tiny else overrides["num_inference_steps"]
        settings = pipe.sampling_settings(**(overrides | dict(num_inference_steps=steps, precision="bf16")))
        for batch in batches:
            g = torch.Generator().manual_seed(batch)
            reference = (torch.rand(batch, 3, *image, generator=g) * 2 - 1).to(device)
            pose = torch.rand(batch, 3, *image, generator=g).to(device)
            noise = torch.randn(batch, pipe.denoiser.config.in_channels, *pipe.denoiser.config.sample_size)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                inputs = pipe.encode_inputs(reference, pose)
                conditions = pipe.denoiser.encode_conditions(*inputs)
                pipe.denoise(conditions, settings, noise, progress=False)  # warm-up
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                pipe.denoise(conditions, settings, noise, progress=False)
                sync(device)
                loop, loop_peak = time.perf_counter() - start, peak_mib(device)
            pipe.reference_encodings.clear()  # new references: encoded in the timed call
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            pipe.generate(reference, pose, settings, noise)
            sync(device)
            whole, whole_peak = time.perf_counter() - start, peak_mib(device)
            cells = [
                label,
                batch,
                f"{batch / loop:.1f}",
                f"{loop_peak:.0f}",
                f"{batch / whole:.1f}",
                f"{whole_peak:.0f}",
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
            print(lines[-1], flush=True)
    return lines


def training(tiny: bool, batch: int, steps: int) -> list[str]:
    settings = ["synthetic 64x48 stage 1"] if tiny else ["S/2 256x176", "B/2 256x176"]
    additions = ["paper", "routing"] if tiny else list(ADDITIONS)
    lines = [
        f"## training, batch {batch} with the masked pass, {steps} timed steps after one warm-up",
        "| model | recipe | samples/s | peak MiB |",
        "|---|---|---|---|",
    ]
    print("\n" + "\n".join(lines), flush=True)
    speed_ups = []
    for setting in settings:
        paper = None
        for addition in additions:
            r = run_one(setting, "ours", True, batch, steps, addition)
            paper = paper or r["samples_per_second"]
            lines.append(f"| {setting} | {addition} | {r['samples_per_second']:.1f} | {r['peak_mib']:.0f} |")
            print(lines[-1], flush=True)
            if addition != "paper":
                ratio = r["samples_per_second"] / paper
                speed_ups.append(f"speed-up {setting}, {addition}: {ratio:.2f}x the paper's recipe")
    print("\n" + "\n".join(speed_ups), flush=True)
    return lines + [""] + speed_ups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "sampling", "training"), default="all")
    parser.add_argument("--tiny", action="store_true", help="tiny stand-ins on the CPU (for the tests)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()
    if args.tiny:
        args.batches, args.train_batch, args.train_steps = [1, 2], 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    start = time.perf_counter()
    lines = [f"# {name}" + ("" if device.type == "cpu" else f"; torch {torch.__version__}")]
    print(lines[0], flush=True)
    if args.part in ("all", "sampling"):
        lines += sampling(args.tiny, args.batches, device) + [""]
    if args.part in ("all", "training"):
        lines += training(args.tiny, args.train_batch, args.train_steps)
    lines.append(f"# wall time {time.perf_counter() - start:.0f} s")
    print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
