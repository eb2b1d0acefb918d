"""Training-step throughput and peak memory: our schedule of work against the public code's, in the same run.

One training step = the X-MDPT objective (full pass + masked pass, or the full pass alone) + backward + AdamW.
"public" reproduces the public code's schedule (`public_schedule.py`): conditions encoded in each pass, the reference
latent's tokens through every block (without gradient) in both passes, although only the masked pass reads them, after
the first depth - 2 blocks. Each configuration runs in its own process so that its peak memory (max RSS on a CPU, max
allocated on a GPU) is its own. Conditioning features are random tensors of DINOv2's shapes (the encoders are frozen
and identical in both schedules).

    python bench/training.py                       # S/2 at 256x176 (latent 32x22), batch 8; the synthetic stages
    python bench/training.py --batch 32 --steps 5
    python bench/training.py --only "synthetic 64x48 stage 2"     # the embedded default's model
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from public_schedule import PublicScheduleDenoiser

ROOT = Path(__file__).resolve().parents[1]


def build(setting: str):
    from xmdpt import XMDPT, LearnedImageEncoder, xmdpt_from_preset

    if setting == "S/2 256x176":
        model = xmdpt_from_preset("S/2", sample_size=(32, 22))
        shapes = dict(pose=(257, 768), reference=(257, 1536), latent=(4, 32, 22))
        return model, shapes
    # The embedded default's two stages: pixel-space 64x48, learned encoders of width 96, the pose map (stage 1,
    # configs/synthetic-cpu.yaml); plus reference attention and the refiner (stage 2,
    # configs/default-model/synthetic-cpu-reference.yaml).
    encoder = LearnedImageEncoder(image_size=(64, 48), width=96)
    model = XMDPT(
        sample_size=(16, 12), in_channels=48, hidden_size=192, depth=6, num_heads=6,
        pose_feature_dim=96, pose_num_tokens=encoder.num_tokens,
        reference_feature_dim=96, reference_num_tokens=encoder.num_tokens, pose_map_channels=48,
        reference_layers=2 if "stage 2" in setting else 0, refine_channels=64 if "stage 2" in setting else 0,
    )  # fmt: skip
    shapes = dict(pose=(encoder.num_tokens, 96), reference=(encoder.num_tokens, 96), latent=(48, 16, 12))
    shapes["pose_map"] = True  # a rendered 64x48 pose image
    return model, shapes


def measure(setting: str, schedule: str, mask: bool, batch: int, steps: int) -> dict:
    """Run in a fresh process: seconds per step and peak memory of one configuration."""
    from xmdpt import XMDPTLoss, make_train_scheduler

    torch.manual_seed(0)
    model, shapes = build(setting)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    objective = XMDPTLoss(make_train_scheduler(), mask_ratio=0.3 if mask else 0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    g = torch.Generator().manual_seed(1)
    inputs = (
        torch.randn(batch, *shapes["pose"], generator=g).to(device),
        torch.randn(batch, *shapes["reference"], generator=g).to(device),
        torch.randn(batch, *shapes["latent"], generator=g).to(device),
        torch.rand(batch, 3, 64, 48, generator=g).to(device) if "pose_map" in shapes else None,
    )
    latents = torch.randn(batch, *shapes["latent"], generator=g).to(device)
    times = []
    for step in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if schedule == "public":  # conditions re-encoded in every pass
            net, conditions = PublicScheduleDenoiser(model, inputs), None
        else:  # once per step, for both passes
            net, conditions = model, model.encode_conditions(*inputs)
        out = objective(net, latents, conditions, generator=torch.Generator().manual_seed(step))
        out.loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sum(times[1:]) / steps
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"seconds_per_step": seconds, "samples_per_second": batch / seconds, "peak_mib": peak}


def run_one(setting: str, schedule: str, mask: bool, batch: int, steps: int) -> dict:
    args = [sys.executable, __file__, "--one", json.dumps([setting, schedule, mask, batch, steps])]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


SETTINGS = ("S/2 256x176", "synthetic 64x48 stage 1", "synthetic 64x48 stage 2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", choices=SETTINGS, help="Measure one model only.")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32")
    print(f"# batch {args.batch}, mean of {args.steps} steps after one warm-up step; peak = max RSS (CPU)")
    print("| model | masked pass | public samples/s | ours samples/s | speed-up | public peak MiB | ours peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for setting in [args.only] if args.only else SETTINGS:
        for mask in (True, False):
            public = run_one(setting, "public", mask, args.batch, args.steps)
            ours = run_one(setting, "ours", mask, args.batch, args.steps)
            ratio = ours["samples_per_second"] / public["samples_per_second"]
            speeds = f"{public['samples_per_second']:.2f} | {ours['samples_per_second']:.2f} | {ratio:.2f}x"
            memory = f"{public['peak_mib']:.0f} | {ours['peak_mib']:.0f}"
            print(f"| {setting} | {'yes' if mask else 'no'} | {speeds} | {memory} |", flush=True)


if __name__ == "__main__":
    main()
