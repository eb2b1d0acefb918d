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
