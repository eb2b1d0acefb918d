"""Training-step throughput and peak memory: our schedule of work against the public code's, and the training
speed-ups (issue 19) against the paper's recipe, in the same run.

One training step = the X-MDPT objective (full pass + masked pass, or the full pass alone) + backward + AdamW.
"public" reproduces the public code's schedule (`public_schedule.py`): conditions encoded in each pass, the reference
latent's tokens through every block (without gradient) in both passes, although only the masked pass reads them, after
the first depth - 2 blocks. Each configuration runs in its own process so that its peak memory (max RSS on a CPU, max
allocated on a GPU) is its own. Conditioning features are random tensors of DINOv2's shapes (the encoders are frozen
and identical in both schedules).

The speed-ups, for S/2 and B/2 at 256x176, each against the paper's recipe (our schedule, fp32, mask ratio 0.3):
token routing (TREAD, half the tokens skip blocks 2-9), REPA (block 3 against DINOv2-g's features of the target, as
the feature cache serves them: no encoder pass is timed; the 2048-wide projector is), self-alignment (block 3 against
the EMA's block 8 at lower noise: the EMA's forward up to block 8 is timed), bf16 autocast, all of them at once, and
SPRINT (75% of the tokens skip blocks 2-9, then the dense-sparse fusion). Each prints a line beginning `speed-up`.

    python bench/training.py                       # everything: the schedules, then the speed-ups
    python bench/training.py --part schedule --batch 32 --steps 5
    python bench/training.py --only "synthetic 64x48 stage 2"     # the embedded default's model
    python bench/training.py --part additions --models "S/2 256x176" --batch 4 --steps 2
    python bench/training.py --part additions --additions SPRINT --threads 1   # one speed-up against the recipe
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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


def build(setting: str, fusion: bool = False):
    """The model of `setting`; with `fusion`, SPRINT's dense-sparse fusion around TREAD's default span."""
    from xmdpt import XMDPT, LearnedImageEncoder, xmdpt_from_preset
    from xmdpt.models.xmdpt import route_span

    if setting in ("S/2 256x176", "B/2 256x176"):
        preset = setting.split()[0]
        span = list(route_span(None, 12, 2)) if fusion else None
        model = xmdpt_from_preset(preset, sample_size=(32, 22), fusion_blocks=span)
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
        fusion_blocks=list(route_span(None, 6, 2)) if fusion else None,
    )  # fmt: skip
    shapes = dict(pose=(encoder.num_tokens, 96), reference=(encoder.num_tokens, 96), latent=(48, 16, 12))
    shapes["pose_map"] = True  # a rendered 64x48 pose image
    return model, shapes


# The speed-ups measured against the paper's recipe ("paper"), each alone and all together.
ADDITIONS = {
    "paper": (),
    "routing": ("routing",),
    "REPA": ("repa",),
    "self-alignment": ("self",),
    "bf16": ("bf16",),
    "all": ("routing", "repa", "self", "bf16"),
    "SPRINT": ("sprint",),  # 75% of the tokens skip the span, the dense-sparse fusion after it
}


def objective_for(model, mask: bool, parts: tuple[str, ...]):
    """The objective with the additions `parts` switched on, at the settings docs/training.md suggests."""
    from xmdpt.diffusion import RepaTerm, SelfAlignmentTerm, XMDPTLoss, make_train_scheduler

    D = model.config.hidden_size
    terms = []
    if "repa" in parts:
        terms.append(RepaTerm(0.5, 3, D, model.config.reference_feature_dim))
    if "self" in parts:
        terms.append(SelfAlignmentTerm(0.5, 3, 8, 200, D))
    return XMDPTLoss(
        make_train_scheduler(),
        mask_ratio=0.3 if mask else 0.0,
        route_ratio=0.75 if "sprint" in parts else 0.5 if "routing" in parts else 0.0,
        alignment_terms=terms,
    )


def measure(setting: str, schedule: str, mask: bool, batch: int, steps: int, addition: str = "paper") -> dict:
    """Run in a fresh process: seconds per step and peak memory of one configuration."""
    from xmdpt.diffusion import AlignmentInputs

    parts = ADDITIONS[addition]
    if parts and schedule != "ours":
        raise ValueError("the speed-ups are measured on our schedule")
    torch.manual_seed(0)
    model, shapes = build(setting, fusion="sprint" in parts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    objective = objective_for(model, mask, parts)
    trainable = [*model.parameters(), *(p for term in objective.alignment_terms for p in term.parameters())]
    for term in objective.alignment_terms:
        term.to(device)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0)
    teacher = copy.deepcopy(model).requires_grad_(False) if "self" in parts else None  # the EMA
    g = torch.Generator().manual_seed(1)
    inputs = (
        torch.randn(batch, *shapes["pose"], generator=g).to(device),
        torch.randn(batch, *shapes["reference"], generator=g).to(device),
        torch.randn(batch, *shapes["latent"], generator=g).to(device),
        torch.rand(batch, 3, 64, 48, generator=g).to(device) if "pose_map" in shapes else None,
    )
    latents = torch.randn(batch, *shapes["latent"], generator=g).to(device)
    target_features = torch.randn(batch, *shapes["reference"], generator=g).to(device)  # the cache's, for REPA
    autocast = torch.autocast(device, torch.bfloat16) if "bf16" in parts else contextlib.nullcontext()
    times = []
    for step in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if schedule == "public":  # conditions re-encoded in every pass
                net, conditions = PublicScheduleDenoiser(model, inputs), None
            else:  # once per step, for both passes
                net, conditions = model, model.encode_conditions(*inputs)
            alignment = None
            if objective.alignment_terms:
                teacher_conditions = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_conditions = teacher.encode_conditions(*inputs)
                alignment = AlignmentInputs(target_features, teacher, teacher_conditions)
            generator = torch.Generator().manual_seed(step)
            out = objective(net, latents, conditions, generator=generator, alignment=alignment)
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


THREADS: list[int] = []  # --threads, for the measuring processes; empty: torch's default


def run_one(setting: str, schedule: str, mask: bool, batch: int, steps: int, addition: str = "paper") -> dict:
    args = [sys.executable, __file__, "--one", json.dumps([setting, schedule, mask, batch, steps, addition])]
    args += [f"--threads={THREADS[0]}"] if THREADS else []
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


SETTINGS = ("S/2 256x176", "synthetic 64x48 stage 1", "synthetic 64x48 stage 2")
ADDITION_SETTINGS = ("S/2 256x176", "B/2 256x176")


def schedules(settings, batch: int, steps: int) -> None:
    print("| model | masked pass | public samples/s | ours samples/s | speed-up | public peak MiB | ours peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for setting in settings:
        for mask in (True, False):
            public = run_one(setting, "public", mask, batch, steps)
            ours = run_one(setting, "ours", mask, batch, steps)
            ratio = ours["samples_per_second"] / public["samples_per_second"]
            speeds = f"{public['samples_per_second']:.2f} | {ours['samples_per_second']:.2f} | {ratio:.2f}x"
            memory = f"{public['peak_mib']:.0f} | {ours['peak_mib']:.0f}"
            print(f"| {setting} | {'yes' if mask else 'no'} | {speeds} | {memory} |", flush=True)


def additions(settings, batch: int, steps: int, repeat: int = 1, names=tuple(ADDITIONS)) -> None:
    """The paper's recipe and each speed-up (our schedule, the masked pass on), then a `speed-up` line for each.
    With `repeat` > 1 every configuration runs in each of that many rounds and keeps its fastest: on a shared machine
    a burst of other work then slows one round, not the ratio."""
    print("| model | training | samples/s | peak MiB |")
    print("|---|---|---|---|")
    lines = []
    for setting in settings:
        results: dict[str, dict] = {}
        for _ in range(repeat):
            for name in dict.fromkeys(["paper", *names]):
                result = run_one(setting, "ours", True, batch, steps, name)
                if name not in results or result["samples_per_second"] > results[name]["samples_per_second"]:
                    results[name] = result
        for name, result in results.items():
            print(
                f"| {setting} | {name} | {result['samples_per_second']:.2f} | {result['peak_mib']:.0f} |", flush=True
            )
        paper = results["paper"]
        for name, result in results.items():
            if name != "paper":
                ratio = result["samples_per_second"] / paper["samples_per_second"]
                memory = result["peak_mib"] / paper["peak_mib"]
                ours, theirs = result["samples_per_second"], paper["samples_per_second"]
                lines.append(
                    f"speed-up {setting} {name}: {ratio:.2f}x samples/s against the paper's recipe "
                    f"({ours:.2f} vs {theirs:.2f}; peak memory {memory:.2f}x)"
                )
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--part", choices=("all", "schedule", "additions"), default="all")
    parser.add_argument("--only", choices=SETTINGS, help="Measure one model only (the schedule comparison).")
    parser.add_argument(
        "--models", nargs="+", choices=ADDITION_SETTINGS, default=list(ADDITION_SETTINGS), help="for the speed-ups"
    )
    parser.add_argument(
        "--additions", nargs="+", choices=list(ADDITIONS), default=list(ADDITIONS), help="the speed-ups to measure"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the speed-ups; each keeps its fastest")
    parser.add_argument("--threads", type=int, help="torch threads of the measuring processes (default: torch's)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        THREADS[:] = [args.threads]
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32 unless noted")
    print(f"# batch {args.batch}, mean of {args.steps} steps after one warm-up step; peak = max RSS (CPU)")
    if args.part in ("all", "schedule"):
        schedules([args.only] if args.only else SETTINGS, args.batch, args.steps)
    if args.part in ("all", "additions"):
        additions(args.models, args.batch, args.steps, args.repeat, args.additions)


if __name__ == "__main__":
    main()
