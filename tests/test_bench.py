"""The training benchmark runs (nothing else would notice it rotting) and compares like with like."""

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import randomize

BENCH = Path(__file__).resolve().parents[1] / "bench" / "training.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_training", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("schedule", ["ours", "public"])
def test_training_benchmark_measures_the_synthetic_default(bench, schedule):
    result = bench.measure("synthetic 64x48 stage 2", schedule, mask=True, batch=2, steps=1)
    assert result["seconds_per_step"] > 0 and result["peak_mib"] > 0


@pytest.mark.parametrize("setting", ["synthetic 64x48 stage 1", "synthetic 64x48 stage 2"])
def test_public_schedule_computes_the_same_function(bench, setting):
    from public_schedule import PublicScheduleDenoiser

    model, shapes = bench.build(setting)
    randomize(model, std=0.05)  # not the zero-initialised output layer, which any two schedules agree on
    assert model.config.pose_map_channels == 48  # the shipped config's model
    assert (model.config.reference_layers, model.config.refine_channels) == ((2, 64) if "2" in setting else (0, 0))
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(2, *shapes["pose"], generator=g),
        torch.randn(2, *shapes["reference"], generator=g),
        torch.randn(2, *shapes["latent"], generator=g),
        torch.rand(2, 3, 64, 48, generator=g),
    )
    sample = torch.randn(2, *shapes["latent"], generator=g)
    t, drop = torch.tensor([10, 900]), torch.tensor([False, True])
    ids_keep = torch.stack([torch.randperm(model.num_tokens, generator=g)[:30] for _ in range(2)])
    public = PublicScheduleDenoiser(model, inputs)
    calls = []
    hook = model.blocks[-1].register_forward_hook(lambda *args: calls.append(1))
    for keep in (None, ids_keep):
        calls.clear()
        ours = model(sample, t, model.encode_conditions(*inputs), drop_condition=drop, ids_keep=keep)
        ours_calls = len(calls)
        theirs = public(sample, t, None, drop_condition=drop, ids_keep=keep)
        assert ours.abs().mean() > 1e-2
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert len(calls) - ours_calls == 2 * ours_calls  # the public schedule also runs the reference tokens
    hook.remove()


def test_pipeline_benchmark_times_every_stage_of_a_real_image():
    """bench/pipeline.py (full-size stages with random weights) runs end to end in its tiny mode."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "pipeline.py"
    done = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in ("pose encoder", "reference encoder", "VAE decode"):
        assert stage.lower() in done.stdout.lower(), done.stdout


def test_training_benchmark_measures_the_speed_ups(bench):
    """All speed-ups at once run at the real S/2 architecture (routing, REPA's and self-alignment's projectors, the
    EMA teacher, bf16 autocast); the schedule comparison's public code takes none of them."""
    result = bench.measure("S/2 256x176", "ours", mask=True, batch=1, steps=1, addition="all")
    assert result["seconds_per_step"] > 0 and result["peak_mib"] > 0
    with pytest.raises(ValueError, match="our schedule"):
        bench.measure("S/2 256x176", "public", mask=True, batch=1, steps=1, addition="routing")
    # SPRINT: the fused model (blocks 2-9 of S/2, 2-3 of the synthetic model) and a quarter of the tokens through
    assert bench.build("S/2 256x176", fusion=True)[0].fusion_span == (2, 10)
    result = bench.measure("synthetic 64x48 stage 1", "ours", mask=True, batch=2, steps=1, addition="SPRINT")
    assert result["seconds_per_step"] > 0


def test_training_benchmark_prints_a_speed_up_line_for_each_addition(bench, monkeypatch, capsys):
    rates = {"paper": 2.0, "routing": 3.0, "REPA": 1.8, "self-alignment": 1.6, "bf16": 4.0, "all": 5.0, "SPRINT": 3.2}
    monkeypatch.setattr(
        bench,
        "run_one",
        lambda *args: {"samples_per_second": rates[args[-1]], "peak_mib": 100.0, "seconds_per_step": 1},
    )
    bench.main(["--part", "additions", "--models", "S/2 256x176", "B/2 256x176"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("speed-up")]
    assert len(lines) == 2 * (len(rates) - 1)
    assert "speed-up B/2 256x176 routing: 1.50x samples/s against the paper's recipe" in lines[-6]
    assert "speed-up B/2 256x176 SPRINT: 1.60x samples/s against the paper's recipe" in lines[-1]
    bench.main(["--part", "additions", "--models", "S/2 256x176", "--additions", "SPRINT"])  # one, with the recipe
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("speed-up")]
    assert len(lines) == 1 and "S/2 256x176 SPRINT: 1.60x samples/s against the paper's recipe (3.20 vs 2" in lines[0]


def test_time_to_quality_trains_scores_plots_and_reports_in_its_tiny_mode(tmp_path):
    """bench/time_to_quality.py end to end on a tiny model and set, two runs side by side: every config trains for
    the same few seconds, is scored on held-out pairs at minute 0, every --eval-every minutes and at the end (off the
    clock), and lands in the CSV, the plot, the minutes-to table and a time-to-quality line against the recipe."""
    import csv
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "time_to_quality.py"
    args = ["--tiny", "--configs", "paper", "all", "--seeds", "0", "--minutes", "0.06", "--eval-every", "0.02"]
    args += ["--pairs", "2", "--ssim", "0", "0.99", "--pose", "0", "--out", str(tmp_path), "--jobs", "2"]
    args += ["--threads", "1"]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {row["config"] for row in rows} == {"paper", "all"}
    for name in ("paper", "all"):
        minutes = [float(row["train_minutes"]) for row in rows if row["config"] == name]
        assert minutes[0] == 0 and 0.06 <= minutes[-1] < 0.5  # the same training time
        assert any(0.02 <= m < 0.06 for m in minutes)  # the periodic evaluations, not only the first and last
        steps = [int(row["step"]) for row in rows if row["config"] == name]
        assert steps == sorted(steps) and steps[-1] > 0
    assert (tmp_path / "ssim.png").stat().st_size > 1000
    assert "| paper | 0 |" in done.stdout and "| 0.0 | not in 0 |" in done.stdout  # SSIM 0 at minute 0; 0.99 never
    assert "time-to-quality all, SSIM 0.00 and pose >= 0%: 0.0 against 0.0 minutes, 1.00x" in done.stdout
    assert "time-to-quality all, SSIM 0.99 and pose >= 0%: not reached by every seed" in done.stdout
    # The same measurement reported again at another level, without training.
    again = [sys.executable, str(script), "--from-csv", str(tmp_path / "results.csv"), "--ssim", "0.01", "--pose", "0"]
    done = subprocess.run(again, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "minutes to SSIM 0.01" in done.stdout and "time-to-quality all, SSIM 0.01" in done.stdout
    assert (tmp_path / "results.png").stat().st_size > 1000
