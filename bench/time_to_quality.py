"""Time to quality on the synthetic benchmark: the paper's recipe against each training speed-up and all of them.

Every configuration trains `configs/synthetic-cpu.yaml` (the embedded default's stage 1: SSIM about 0.55-0.6 after
9,000 steps, 91 minutes on 2 cores) for the same training wall time, with each seed, one after the other on this
machine, each in a process of its own. Every `--eval-every` minutes of training the clock stops and the EMA model is
scored on the same `--pairs` held-out pairs (`xmdpt demo`'s machinery: SSIM against the ground truth, and the pose
match: is the output nearest to the target among the person in 16 poses?), DPM-Solver++ at the checkpoint pipeline's
steps and guidance, as `scripts/score_checkpoints.py` does. Writes `results.csv` and `ssim.png` (held-out SSIM
against training minutes, one line per run) to `--out`, and prints the minutes each run needed to reach SSIM
`--ssim` with a pose match of at least `--pose` of the pairs.

REPA is not among them: the synthetic set has no pretrained encoder offline (its encoders are learned), which is
what self-alignment is for; `bench/training.py` measures REPA's step cost at real scale. On a machine whose cores
another job shares, give `--threads 1`: two processes with 2 OpenMP threads each on 2 cores slow each other down 10x
and more, bf16 steps most (docs/benchmarks.md).

    python bench/time_to_quality.py --threads 1                       # hours: 5 configs x 2 seeds x 90 minutes
    python bench/time_to_quality.py --minutes 30 --configs paper all  # a shorter comparison
    python bench/time_to_quality.py --tiny                            # a smoke test: seconds
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "synthetic-cpu.yaml"

# Each speed-up as config overrides. Routing: half the tokens skip blocks 2-3 of the 6 (the default span, from block
# 2 to depth - decode_layers). Self-alignment: block 1 against the EMA's block 4 (SRA's 8 -> 20 of 28 blocks, scaled
# to 6), projector 512 wide (the model is 192 wide; REPA's 2048 would cost more than the model's own step).
ROUTING = ["objective.route_ratio=0.5"]
SELF_ALIGNMENT = [
    "objective.self_align_weight=0.5",
    "objective.self_align_blocks=[1,4]",
    "objective.align_width=512",
]
BF16 = ["optim.mixed_precision=bf16"]
CONFIGS = {
    "paper": [],
    "routing": ROUTING,
    "self-alignment": SELF_ALIGNMENT,
    "bf16": BF16,
    "all": [*ROUTING, *SELF_ALIGNMENT, *BF16],
}
# --tiny: a model and a set small enough for a smoke test of the whole measurement in seconds.
TINY = [
    "model.hidden_size=32",
    "model.num_heads=2",
    "conditioning.learned_width=16",
    "data.synth_identities=12",
    "data.num_workers=0",
    "optim.batch_size=4",
    "objective.align_width=16",
]
FIELDS = ("config", "seed", "step", "train_minutes", "ssim", "psnr", "pose_match", "pairs")


def run_config(name: str, seed: int, minutes: float, eval_every: float, pairs: int, out: Path, extra: list[str]):
    """Train one configuration for `minutes` of training time (evaluation excluded); one row per evaluation."""
    from xmdpt.demo import run_demo
    from xmdpt.training.build import synth_config
    from xmdpt.training.config import load_config
    from xmdpt.training.trainer import Trainer

    overrides = [
        *CONFIGS[name],
        *extra,
        f"run.seed={seed}",
        f"run.out_dir={out / f'{name}-seed{seed}'}",
        "optim.max_steps=100000000",  # the clock stops the run
        "optim.decay_steps=0",
        "run.checkpoint_every=100000000",  # one checkpoint, when the time is up
        "run.sample_every=1",  # after every step the trainer calls `sample_grid`: the evaluation hook below
        "run.sample_pairs=0",
    ]
    config = load_config(BASE, overrides)

    class TimedTrainer(Trainer):
        """Stops after `minutes` of training, and scores the EMA every `eval_every` minutes, off the clock."""

        trained, mark, next_eval = 0.0, None, 0.0
        rows: list[dict] = []

        def clock(self) -> float:
            now = time.perf_counter()
            if self.mark is not None:
                self.trained += now - self.mark
            self.mark = now
            return self.trained

        def _stop_requested(self, stop) -> bool:
            return self.clock() >= minutes * 60 or super()._stop_requested(stop)

        def sample_grid(self) -> None:
            if self.clock() < self.next_eval:
                return
            self.evaluate()
            self.next_eval += eval_every * 60
            self.mark = time.perf_counter()  # the evaluation is off the clock

        def evaluate(self) -> None:
            pipe = self.ema_pipeline()
            pipe.set_sampler("dpmsolver++")
            result = run_demo(pipe, synth_config(self.config), pipe.sampling_settings(), pairs, seed=1, progress=False)
            self.ema.module.train()
            scores = result.model
            row = dict(
                config=name, seed=seed, step=self.step, train_minutes=round(self.trained / 60, 3),
                ssim=round(float(scores.ssim.mean()), 4), psnr=round(float(scores.psnr.mean()), 3),
                pose_match=int(scores.pose_match.sum()), pairs=len(scores.ssim),
            )  # fmt: skip
            self.rows.append(row)
            print(json.dumps(row), flush=True)

    trainer = TimedTrainer(config)
    trainer.evaluate()  # minute 0
    trainer.next_eval = eval_every * 60
    trainer.train()
    trainer.evaluate()  # where the time ran out
    trainer.close()


def minutes_to(rows: list[dict], ssim: float, pose_fraction: float) -> float | None:
    """The first evaluation's training minutes at which both targets were met, or None."""
    for row in sorted(rows, key=lambda r: r["train_minutes"]):
        if row["ssim"] >= ssim and row["pose_match"] >= pose_fraction * row["pairs"]:
            return row["train_minutes"]
    return None


def plot(rows: list[dict], path: Path, ssim: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(CONFIGS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for (name, seed), group in sorted(group_runs(rows).items()):
        group.sort(key=lambda r: r["train_minutes"])
        ax.plot(
            [r["train_minutes"] for r in group], [r["ssim"] for r in group], color=colours.get(name),
            linestyle="-" if seed == min(r["seed"] for r in rows) else "--", label=f"{name} (seed {seed})",
        )  # fmt: skip
    ax.axhline(ssim, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("training wall-clock minutes (evaluation excluded)")
    ax.set_ylabel("held-out SSIM (EMA)")
    ax.set_title("Time to quality, synthetic 64x48 (configs/synthetic-cpu.yaml)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def group_runs(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["config"], int(row["seed"])), []).append(row)
    return groups


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--minutes", type=float, default=90.0, help="training minutes per run (default 90)")
    parser.add_argument("--eval-every", type=float, default=5.0, help="training minutes between evaluations")
    parser.add_argument("--pairs", type=int, default=16, help="held-out pairs per evaluation")
    parser.add_argument("--ssim", type=float, default=0.60, help="the SSIM to reach")
    parser.add_argument("--pose", type=float, default=15 / 16, help="the pose match to reach, a fraction of pairs")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "time-to-quality")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's; 1 on a shared machine)")
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny model and set, seconds per run")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.one:
        name, seed, minutes, eval_every, pairs, out, extra = json.loads(args.one)
        run_config(name, seed, minutes, eval_every, pairs, Path(out), extra)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    extra = []
    if args.tiny:
        data = Path(tempfile.mkdtemp(prefix="ttq-synth-"))
        extra = [*TINY, f"data.root={data}"]
    rows = []
    for name in args.configs:
        for seed in args.seeds:
            job = json.dumps([name, seed, args.minutes, args.eval_every, args.pairs, str(args.out), extra])
            started = time.perf_counter()
            command = [
                sys.executable,
                __file__,
                "--one",
                job,
                *([f"--threads={args.threads}"] if args.threads else []),
            ]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
            if done.returncode:
                raise SystemExit(f"{name} seed {seed} failed:\n{done.stderr[-3000:]}")
            new = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            rows += new
            last = new[-1]
            print(
                f"{name} seed {seed}: {last['step']} steps in {last['train_minutes']:.1f} training minutes "
                f"({(time.perf_counter() - started) / 60:.1f} wall), SSIM {last['ssim']:.3f}, "
                f"pose {last['pose_match']}/{last['pairs']}",
                flush=True,
            )
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "ssim.png", args.ssim)
    target = f"SSIM {args.ssim:.2f} and pose >= {args.pose:.0%}"
    print(f"| config | seed | minutes to {target} | final SSIM | final pose |")
    print("|---|---|---|---|---|")
    for (name, seed), group in group_runs(rows).items():
        reached = minutes_to(group, args.ssim, args.pose)
        last = max(group, key=lambda r: r["train_minutes"])
        when = f"{reached:.1f}" if reached is not None else f"not within {last['train_minutes']:.0f}"
        print(f"| {name} | {seed} | {when} | {last['ssim']:.3f} | {last['pose_match']}/{last['pairs']} |")
    print(f"wrote {args.out / 'results.csv'} and {args.out / 'ssim.png'}")


if __name__ == "__main__":
    main()
