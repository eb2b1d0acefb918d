"""Kill -9 and resume: how many resumed runs end bit-identical to an uninterrupted one.

A tiny CPU training run (the test suite's TINY settings: depth 2, width 32, learned encoders, pixel codec, 32x24
images, batch 4) on a small synthetic set made once in a temporary folder. For each `data.num_workers` setting: one
uninterrupted run of --steps steps (a checkpoint every --every), then --trials times the same run in a subprocess
(`python -m xmdpt train ...`), SIGKILLed at a random moment between its first checkpoint and its end (the delay after
the first checkpoint is drawn uniformly over the uninterrupted run's time from its first checkpoint to its final one,
seeded by --seed), followed by `--resume` to the end. The final checkpoint's model, EMA and optimizer tensors are
compared bit for bit with the uninterrupted run's.

    python bench/kill_resume.py                      # 20 trials each with data.num_workers=0 and 1
    python bench/kill_resume.py --workers 0 --trials 5 --seed 3

It stops starting trials once --budget seconds (default 840) are spent and says how many ran.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.preset=null",
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "conditioning.encoder=learned",
    "conditioning.learned_width=32",
    "conditioning.codec=pixel",
    "conditioning.pixel_factor=4",
    "data.layout=synthetic",
    "data.size=[32,24]",
    "data.synth_identities=12",
    "objective.prediction_type=v_prediction",
    "optim.lr=1e-3",
    "optim.batch_size=4",
    "optim.ema_decay=0.9",
    "optim.mixed_precision=fp32",
    "run.device=cpu",
    "run.log_every=2",
    "run.sample_every=0",
]
FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen(
            [sys.executable, "-m", "xmdpt", "train", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def latest(run: Path) -> str | None:
    try:
        return (run / "checkpoints" / "latest").read_text().strip() or None
    except OSError:
        return None


def wait_first_checkpoint(proc: subprocess.Popen, run: Path) -> float:
    while latest(run) is None and proc.poll() is None:
        time.sleep(0.001)
    return time.perf_counter()


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def bitwise_differences(a_dir: Path, b_dir: Path) -> list[str]:
    """Names of the tensors (file:key) that differ in dtype, shape or any bit; [] when all are identical."""
    diffs = []
    for name in FILES:
        a, b = load_file(a_dir / name), load_file(b_dir / name)
        for key in sorted(a.keys() | b.keys()):
            x, y = a.get(key), b.get(key)
            same = (
                x is not None
                and y is not None
                and x.dtype == y.dtype
                and x.shape == y.shape
                and torch.equal(raw_bits(x), raw_bits(y))
            )
            if not same:
                diffs.append(f"{name}:{key}")
    return diffs


def final_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / latest(run)


def bench_setting(work: Path, synth: Path, workers: int, opts, rng: random.Random, deadline: float) -> tuple[int, int]:
    common = [*TINY, f"data.root={synth}", f"data.num_workers={workers}", f"optim.max_steps={opts.steps}",
              f"run.checkpoint_every={opts.every}", f"run.keep_last={opts.steps}"]  # fmt: skip
    base = work / f"w{workers}"
    base.mkdir()
    straight = base / "straight"
    t0 = time.perf_counter()
    proc = start([*common, f"run.out_dir={straight}"], base / "straight.log")
    first = wait_first_checkpoint(proc, straight)
    final_name = f"step_{opts.steps:08d}"
    while latest(straight) != final_name and proc.poll() is None:
        time.sleep(0.0005)
    last = time.perf_counter()
    rc = proc.wait()
    if rc != 0 or latest(straight) != final_name:
        sys.exit(f"the uninterrupted run failed (exit {rc}); see {base / 'straight.log'}")
    window = last - first
    print(f"\ndata.num_workers={workers}: uninterrupted run {time.perf_counter() - t0:.1f} s; the kill window is its "
          f"{window * 1000:.0f} ms from the first checkpoint to the final one ({final_name})")  # fmt: skip
    print("| trial | kill after first ckpt (ms) | killed at step | newest step folder | partial .tmp_step | "
          "resumed from | bit-identical |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    reference = final_checkpoint(straight)
    identical = ran = 0
    per_trial = None
    for trial in range(1, opts.trials + 1):
        if per_trial is not None and time.perf_counter() + per_trial > deadline:
            print(f"(budget spent: stopped after {ran} trials)")
            break
        t_trial = time.perf_counter()
        run = base / f"trial{trial:02d}"
        for _attempt in range(5):  # redraw when the run ended before the kill (it then has nothing to resume)
            shutil.rmtree(run, ignore_errors=True)
            delay = rng.uniform(0.0, window)
            proc = start([*common, f"run.out_dir={run}"], base / f"trial{trial:02d}.log")
            first = wait_first_checkpoint(proc, run)
            while proc.poll() is None and time.perf_counter() - first < delay:
                time.sleep(0.0005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            if proc.wait() == -signal.SIGKILL:
                break
        else:
            print(f"| {trial} | - | run finished before every kill | | | | skipped |")
            continue
        killed_at = latest(run) or "none"
        steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
        partial = sorted(p.name for p in (run / "checkpoints").glob(".tmp_step_*"))
        resumed = start([*common, f"run.out_dir={run}", "--resume"], base / f"trial{trial:02d}.resume.log")
        rc = resumed.wait()
        log = (base / f"trial{trial:02d}.resume.log").read_text()
        resumed_from = next((line.split("resumed from ")[1].split()[-1] for line in log.splitlines()
                             if "resumed from" in line), "-")  # fmt: skip
        if rc != 0:
            verdict = f"no: resume exit {rc}"
        else:
            diffs = bitwise_differences(reference, final_checkpoint(run))
            verdict = "yes" if not diffs else f"no: {len(diffs)} tensors differ ({', '.join(diffs[:3])})"
            identical += not diffs
            if any((run / "checkpoints").glob(".tmp_step_*")):
                verdict += " (a .tmp_step folder is left after the resume)"
        ran += 1
        print(f"| {trial} | {delay * 1000:.0f} | {killed_at.removeprefix('step_').lstrip('0') or '0'} | "
              f"{steps[-1] if steps else '-'} | {', '.join(partial) or '-'} | step {resumed_from} | {verdict} |",
              flush=True)  # fmt: skip
        per_trial = max(per_trial or 0.0, time.perf_counter() - t_trial)
        if not opts.keep:
            shutil.rmtree(run, ignore_errors=True)
    print(f"data.num_workers={workers}: {identical} of {ran} bit-identical")
    return identical, ran


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=2, help="checkpoint every this many steps")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="data.num_workers settings to try")
    parser.add_argument("--budget", type=float, default=840.0, help="seconds; no trial starts that would end later")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    opts = parser.parse_args()

    from xmdpt.data.synthetic import SynthConfig, generate

    deadline = time.perf_counter() + opts.budget
    rng = random.Random(opts.seed)
    work = Path(tempfile.mkdtemp(prefix="xmdpt-kill-resume-"))
    try:
        synth = work / "synth"
        generate(synth, SynthConfig(num_identities=12, poses_per_identity=4, size=(32, 24), seed=0), progress=False)
        print(f"{opts.steps} steps, a checkpoint every {opts.every}, seed {opts.seed}, torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs; work folder {work}")  # fmt: skip
        results = {w: bench_setting(work, synth, w, opts, rng, deadline) for w in opts.workers}
        print()
        for w, (identical, ran) in results.items():
            print(f"data.num_workers={w}: {identical} of {ran} bit-identical")
        identical, ran = (sum(r[i] for r in results.values()) for i in (0, 1))
        print(f"{identical} of {ran} bit-identical")
    finally:
        if opts.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
