"""Training: configs, the loop, checkpoints, exact resume after SIGKILL, two-process DDP, faults, TensorBoard."""

import copy
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xmdpt.cli import main
from xmdpt.errors import InputError
from xmdpt.pipeline import XMDPTPipeline
from xmdpt.training.config import load_config

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
    "data.num_workers=0",
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


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from xmdpt.data.synthetic import SynthConfig, generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthConfig(num_identities=12, poses_per_identity=4, size=(32, 24), seed=0), progress=False)
    return root


def overrides(synth_root, out_dir, *extra):
    return [*TINY, f"data.root={synth_root}", f"run.out_dir={out_dir}", *extra]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_train(args, **kwargs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "xmdpt", "train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / latest / "model.safetensors")


def ema_at(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "ema.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- configs ----------------------------------------------------------------------------------------------------


def test_shipped_configs_resolve_and_dry_run_prints_them(capsys):
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.optim.batch_size % config.optim.grad_accum == 0
    main(["train", "-c", str(ROOT / "configs" / "synthetic-cpu.yaml"), "--dry-run", "optim.lr=0.002"])
    out = capsys.readouterr().out
    assert "lr: 0.002" in out and "layout: synthetic" in out


def test_published_recipe_is_the_default():
    c = load_config()
    assert (c.optim.lr, c.optim.weight_decay, c.optim.batch_size, c.optim.ema_decay) == (1e-4, 0.0, 32, 0.9999)
    assert (c.objective.mask_ratio, c.objective.condition_dropout, c.optim.mixed_precision) == (0.3, 0.1, "bf16")
    assert c.optim.grad_clip is None and c.optim.warmup_steps == 0


def test_negative_max_steps_is_refused():
    with pytest.raises(InputError, match="max_steps"):
        load_config(None, ["optim.max_steps=-5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=fast", "could not be converted"),
        ("optim.nope=1", "nope"),
        ("run.on_nan=retry", "on_nan"),
        ("optim.batch_size=6", "multiple"),
        ("objective.texture_weight=-1", "texture_weight"),
        ("objective.palette_weight=inf", "palette_weight"),
        ("objective.texture_lags=[1,0]", "texture_lags"),
        ("optim.decay_steps=900000", "decay_steps"),
        ("optim.warmup_steps=-1", "warmup_steps"),
        ("lr", "section.field=value"),
        ("model.preset=XMDPT-Q/2", "model.preset='XMDPT-Q/2': choose one of"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--dry-run", "optim.grad_accum=4", override])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ---- the loop, checkpoints, logs ------------------------------------------------------------------------------


def test_training_writes_checkpoints_logs_and_a_loadable_pipeline(synth_root, tmp_path):
    from xmdpt.training.trainer import train

    out = tmp_path / "run"
    config = load_config(
        None,
        overrides(
            synth_root,
            out,
            "optim.max_steps=6",
            "run.checkpoint_every=2",
            "run.keep_last=2",
            "run.sample_every=3",
            "run.sample_pairs=2",
            "run.sample_steps=2",
        ),
    )
    result = train(config)
    assert result.step == 6 and not result.interrupted
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000004", "step_00000006"]  # the last 2 kept
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert not list((out / "checkpoints").glob(".tmp*"))
    state = json.loads((out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["config"]["optim"]["batch_size"] == 4
    assert (out / "config.yaml").read_text() == config.to_yaml()
    assert (out / "samples" / "step_00000003.png").exists() and (out / "samples" / "step_00000006.png").exists()
    # The exported EMA pipeline loads directly and samples.
    pipe = XMDPTPipeline.from_pretrained(out / "checkpoints" / "step_00000006" / "pipeline")
    ema = load_file(out / "checkpoints" / "step_00000006" / "ema.safetensors")
    torch.testing.assert_close(pipe.denoiser.pos_embed, ema["module.denoiser.pos_embed"])
    images = pipe(torch.zeros(1, 3, 32, 24), torch.zeros(1, 3, 32, 24), num_inference_steps=2, progress=False).images
    assert images[0].size == (24, 32)
    # A synthetic run's export names its data set, so `xmdpt demo --model` scores it on the held-out people.
    from xmdpt.cli import main
    from xmdpt.default_model import load_pipeline, synthetic_set

    synth = synthetic_set(out / "checkpoints" / "step_00000006" / "pipeline")
    assert synth.num_identities == 12 and synth.size == (32, 24)
    exported = load_pipeline(out / "checkpoints" / "step_00000006" / "pipeline", "cpu")
    assert exported.sampling_settings().num_inference_steps == 2  # run.sample_steps, the grids' own
    main(
        ["demo", "--model", str(out / "checkpoints" / "step_00000006" / "pipeline"), "--out", str(tmp_path / "d.png")]
    )
    assert (tmp_path / "d.png").is_file()
    # TensorBoard holds both passes' losses apart, the learning rate and the throughput.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/full_pass", "loss/masked_pass", "lr", "throughput/samples_per_second"} <= tags
    assert len(events.Tags()["images"]) == 1
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["ranks_agree"] and summary["step"] == 6
    # A fresh run in the same folder would start over and prune the earlier run's checkpoints: refused.
    with pytest.raises(InputError, match="add --resume"):
        train(config)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_resume_after_sigkill_is_bit_identical(synth_root, tmp_path):
    common = ["optim.max_steps=30", "run.checkpoint_every=5", "run.keep_last=10"]
    straight = run_train(overrides(synth_root, tmp_path / "straight", *common))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    killed = run_train(overrides(synth_root, tmp_path / "killed", *common))
    target = tmp_path / "killed" / "checkpoints" / "step_00000010"
    deadline = time.time() + 240
    while not target.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = run_train([*overrides(synth_root, tmp_path / "killed", *common), "--resume"])
    log = resumed.stdout.read()
    assert resumed.wait(timeout=300) == 0, log
    assert "resumed from" in log
    assert_same_tensors(weights(tmp_path / "straight"), weights(tmp_path / "killed"))


def test_a_short_run_is_the_long_runs_checkpoint(synth_root, tmp_path):
    """The README's five-minute run equals the long run's checkpoint at that step (constant LR after warm-up)."""
    from xmdpt.training.trainer import train

    common = ["run.checkpoint_every=3", "optim.warmup_steps=2"]
    train(load_config(None, overrides(synth_root, tmp_path / "short", "optim.max_steps=3", *common)))
    train(load_config(None, overrides(synth_root, tmp_path / "long", "optim.max_steps=6", *common)))
    assert_same_tensors(ema_at(tmp_path / "short", 3), ema_at(tmp_path / "long", 3))


def test_learning_rate_warms_up_holds_and_cools_down(synth_root, tmp_path):
    from xmdpt.training.trainer import Trainer

    extra = ["optim.max_steps=10", "optim.warmup_steps=2", "optim.decay_steps=4", "optim.lr=1e-3"]
    trainer = Trainer(load_config(None, overrides(synth_root, tmp_path / "run", *extra)))
    factors = [trainer.lr_factor(step) for step in range(10)]
    assert factors == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)  # the first update's rate


def test_cooling_down_a_resumed_run_is_the_run_planned_that_way(synth_root, tmp_path):
    """Warmup-stable-decay: train at the constant rate, then resume with a larger max_steps and decay_steps to cool
    down; the result is the run configured with both from the start, bit for bit."""
    from xmdpt.training.trainer import Trainer, train

    common, cooled = ["run.checkpoint_every=3", "optim.lr=1e-3"], ["optim.max_steps=6", "optim.decay_steps=3"]
    train(load_config(None, overrides(synth_root, tmp_path / "planned", *cooled, *common)))
    train(load_config(None, overrides(synth_root, tmp_path / "extended", "optim.max_steps=3", *common)))
    resumed = Trainer(load_config(None, overrides(synth_root, tmp_path / "extended", *cooled, *common)), resume=True)
    assert resumed.step == 3 and resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    resumed.train()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # the rate reached the end of the cool-down
    extended = ema_at(tmp_path / "extended", 6)
    assert_same_tensors(ema_at(tmp_path / "planned", 6), extended)
    constant = ema_at(tmp_path / "extended", 3)
    assert any(not torch.equal(constant[key], extended[key]) for key in constant)

    # Resumed again with another rate and a longer cool-down, the rate is this config's at this step.
    longer = ["optim.max_steps=8", "optim.decay_steps=4", "optim.lr=4e-4"]
    again = Trainer(load_config(None, overrides(synth_root, tmp_path / "extended", *common, *longer)), resume=True)
    assert again.step == 6 and again.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`args` under torchrun with two CPU processes (offline, one thread each), output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_train_one_model_equal_to_one_process(synth_root, tmp_path):
    common = ["optim.max_steps=4", "run.checkpoint_every=4", "optim.batch_size=4"]
    ddp = torchrun("-m", "xmdpt", "train", *overrides(synth_root, tmp_path / "ddp", *common))
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    single = run_train(overrides(synth_root, tmp_path / "single", *common))
    assert single.wait(timeout=300) == 0, single.stdout.read()
    summary = json.loads((tmp_path / "ddp" / "run_summary.json").read_text())
    assert summary["processes"] == 2 and summary["ranks_agree"]
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


# ---- faults -----------------------------------------------------------------------------------------------------


def nan_after(trainer, step):
    original = trainer.step_module.forward

    def forward(*args, **kwargs):
        loss, full, masked = original(*args, **kwargs)
        if trainer.step >= step:
            loss = loss * float("nan")
        return loss, full, masked

    trainer.step_module.forward = forward


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synth_root, tmp_path):
    from xmdpt.training.trainer import NonFiniteLoss, Trainer

    config = load_config(None, overrides(synth_root, tmp_path / "run", "optim.max_steps=10", "run.checkpoint_every=2"))
    trainer = Trainer(config)
    nan_after(trainer, 3)
    with pytest.raises(NonFiniteLoss, match="step 4.*step_00000002"):
        trainer.train()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_nan_loss_can_skip_the_step(synth_root, tmp_path):
    from xmdpt.training.trainer import Trainer

    config = load_config(
        None, overrides(synth_root, tmp_path / "run", "optim.max_steps=4", "run.checkpoint_every=4", "run.on_nan=skip")
    )
    trainer = Trainer(config)
    original = trainer.step_module.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        loss, full, masked = original(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 2 else loss), full, masked

    trainer.step_module.forward = forward
    result = trainer.train()
    assert result.step == 4 and trainer.skipped_nan == 1
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "run").values())


def test_unwritable_run_folder_fails_before_training(synth_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as info:
        main(["train", *overrides(synth_root, blocker / "run", "optim.max_steps=2")])
    assert info.value.code == 2


def test_failed_checkpoint_write_leaves_the_previous_one_intact(synth_root, tmp_path):
    from xmdpt.training.trainer import Trainer

    config = load_config(None, overrides(synth_root, tmp_path / "run", "optim.max_steps=6", "run.checkpoint_every=2"))
    trainer = Trainer(config)
    original = trainer.write_checkpoint

    def write(folder, bad_samples):
        if trainer.step == 4:
            (folder / "model.safetensors").write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        original(folder, bad_samples)

    trainer.write_checkpoint = write
    with pytest.raises(OSError, match="No space left.*step_00000002.*intact"):
        trainer.train()
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002"]
    load_file(ckpts / "step_00000002" / "model.safetensors")  # still readable


def after_step(trainer, step: int, action) -> None:
    """Make `trainer` run `action` once its step `step` is complete (where Ctrl-C or a signal would land)."""
    original = trainer.update_ema

    def update():
        original()
        if trainer.step == step:
            action()

    trainer.update_ema = update


def sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def test_ctrl_c_writes_a_checkpoint(synth_root, tmp_path):
    from xmdpt.training.trainer import Trainer

    config = load_config(
        None, overrides(synth_root, tmp_path / "run", "optim.max_steps=50", "run.checkpoint_every=100")
    )
    trainer = Trainer(config)

    def ctrl_c():
        raise KeyboardInterrupt

    after_step(trainer, 3, ctrl_c)
    result = trainer.train()
    assert result.interrupted and result.step == 3
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def test_sigterm_stops_after_the_step_with_a_checkpoint(synth_root, tmp_path):
    """A cluster's pre-emption sends SIGTERM: the run finishes its step, writes a checkpoint and returns, where the
    default action would lose everything since the last checkpoint."""
    from xmdpt.training.trainer import Trainer

    config = load_config(
        None, overrides(synth_root, tmp_path / "run", "optim.max_steps=50", "run.checkpoint_every=100")
    )
    trainer = Trainer(config)
    after_step(trainer, 3, sigterm)
    before = signal.getsignal(signal.SIGTERM)
    result = trainer.train()
    assert result.interrupted and result.step == 3
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert signal.getsignal(signal.SIGTERM) is before  # the handler lives only while training
    resumed = Trainer(config, resume=True)
    assert resumed.step == 3

    # A SIGTERM in the last step changes nothing: the run is complete, and says so.
    trainer = Trainer(load_config(None, overrides(synth_root, tmp_path / "done", "optim.max_steps=2")))
    after_step(trainer, 2, sigterm)
    result = trainer.train()
    assert not result.interrupted and result.step == 2
    assert json.loads((tmp_path / "done" / "run_summary.json").read_text())["step"] == 2


def test_sigterm_to_the_data_workers_too(synth_root, tmp_path):
    """A cluster signals every process of the job, DataLoader workers included: the run still stops after the step
    with a checkpoint, where a worker killed by the signal would take it down between checkpoints."""
    from xmdpt.training.trainer import Trainer

    config = load_config(
        None,
        overrides(
            synth_root, tmp_path / "run", "optim.max_steps=50", "run.checkpoint_every=100", "data.num_workers=1"
        ),
    )
    trainer = Trainer(config)

    def sigterm_everyone():
        workers = multiprocessing.active_children()
        assert workers  # the DataLoader's worker
        for worker in workers:
            os.kill(worker.pid, signal.SIGTERM)
        time.sleep(0.5)  # let the signal land in the worker before the main process fetches its next batch
        sigterm()

    after_step(trainer, 3, sigterm_everyone)
    result = trainer.train()
    assert result.interrupted and result.step == 3
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"


SIGTERM_ONE_RANK = """
import json, os, signal, sys
from xmdpt.training.config import load_config
from xmdpt.training.trainer import Trainer

trainer = Trainer(load_config(None, sys.argv[2:]))
original = trainer.update_ema

def update():
    original()
    if trainer.step == 3 and os.environ["RANK"] == "1":  # only one process is signalled
        os.kill(os.getpid(), signal.SIGTERM)

trainer.update_ema = update
result = trainer.train()
with open(f"{sys.argv[1]}.{os.environ['RANK']}", "w") as f:
    json.dump({"step": result.step, "interrupted": result.interrupted}, f)
"""


def test_sigterm_to_one_process_stops_all_of_them_at_the_same_step(synth_root, tmp_path):
    """Otherwise the signalled rank would stop and the other wait forever in the next gradient all-reduce."""
    script = tmp_path / "train_and_signal.py"
    script.write_text(SIGTERM_ONE_RANK)
    config = overrides(
        synth_root, tmp_path / "ddp", "optim.max_steps=50", "run.checkpoint_every=100", "optim.batch_size=4"
    )
    done = torchrun(str(script), str(tmp_path / "result"), *config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads((tmp_path / f"result.{rank}").read_text()) for rank in (0, 1)]
    assert results == [{"step": 3, "interrupted": True}] * 2
    assert (tmp_path / "ddp" / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def published_setup(tiny_hub) -> list[str]:
    """Frozen DINOv2 encoders and SD-VAE latents, with tiny stand-ins from the `tiny_hub` fixture."""
    return [
        "conditioning.encoder=dinov2",
        f"conditioning.pose_encoder={tiny_hub / 'dinov2'}",
        f"conditioning.reference_encoder={tiny_hub / 'dinov2'}",
        "conditioning.codec=vae",
        f"conditioning.vae={tiny_hub / 'vae'}",
        "data.size=[64,48]",
    ]


def test_published_setup_trains_with_frozen_dinov2_and_vae(synth_root, tmp_path, tiny_hub):
    """The DeepFashion recipe's code path (frozen DINOv2 encoders, SD-VAE latents) with tiny stand-ins."""
    from xmdpt.training.trainer import Trainer

    config = load_config(
        ROOT / "configs" / "deepfashion-256x176-S.yaml",
        [
            *overrides(synth_root, tmp_path / "run", "optim.max_steps=2", "run.checkpoint_every=2"),
            *published_setup(tiny_hub),
            "objective.texture_weight=1.0",  # decodes the x0 estimate through the VAE in the loss
        ],
    )
    trainer = Trainer(config)
    assert set(trainer.step_module.trainable) == {"denoiser"}  # frozen encoders stay outside DDP's module
    assert trainer.denoiser.config.sample_size == [8, 6] and trainer.denoiser.config.pose_num_tokens == 257
    # The reference latent is a posterior sample, as the public loop encodes it (sampling uses the mean).
    batch, seen = next(iter(trainer.loader())), {}
    trainer.step_module.forward = lambda target, reference, *rest: seen.update(reference=reference) or (None,) * 3
    trainer.forward(batch, None, torch.Generator().manual_seed(0))
    del trainer.step_module.forward
    mean = trainer.codec.encode(batch["reference_image"])
    assert seen["reference"].shape == mean.shape and not torch.allclose(seen["reference"], mean)
    assert (seen["reference"] - mean).abs().max() < 1.0  # a sample near the mean, not something else
    result = trainer.train()
    assert result.step == 2
    pipe = XMDPTPipeline.from_pretrained(tmp_path / "run" / "checkpoints" / "step_00000002" / "pipeline")
    assert type(pipe.codec).__name__ == "VAECodec" and type(pipe.pose_encoder).__name__ == "DinoV2Encoder"
    assert (
        pipe.pose_encoder.config.input_transform == "unit"
        and pipe.reference_encoder.config.input_transform == "signed"
    )


def test_feature_cache_serves_the_frozen_outputs_and_trains(synth_root, tmp_path, tiny_hub):
    from xmdpt.training.cache import CachedPairs, image_tensors
    from xmdpt.training.trainer import Trainer

    settings = [
        *overrides(synth_root, tmp_path / "run", "optim.max_steps=2", "run.checkpoint_every=2"),
        *published_setup(tiny_hub),
        "data.cache_features=true",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    config = load_config(None, [*settings, "data.scale=0"])
    trainer = Trainer(config)
    assert isinstance(trainer.dataset, CachedPairs) and list((tmp_path / "cache").glob("shard_*.safetensors"))
    # A cached entry equals the frozen networks' output on the (flipped) image, to float16 precision.
    images = trainer.dataset.dataset  # the image data set the cache serves from
    name = images.pairs[0].target
    image, pose = image_tensors(images, name, flip=True)
    entry = trainer.dataset.entry(name, flip=True)
    frozen = trainer.accelerator.unwrap_model(trainer.step_module).frozen
    with torch.no_grad():
        expected = frozen["pose_encoder"](pose[None])[0]
        latent = trainer.codec.encode(image[None])[0]
    torch.testing.assert_close(entry["pose_features"], expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(entry["mean"], latent, rtol=1e-2, atol=1e-2)
    item = trainer.dataset[0]  # the reference's posterior std travels too, so that its latent is sampled per step
    assert (
        item["reference_latent_std"].shape == item["reference_latent"].shape
        and item["reference_latent_std"].gt(0).all()
    )
    assert trainer.train().step == 2
    fresh = f"run.out_dir={tmp_path / 'other'}"  # the first run's folder now holds checkpoints
    with pytest.raises(InputError, match="data.scale=0"):
        Trainer(load_config(None, [*settings, "data.scale=0.05", fresh]))
    with pytest.raises(InputError, match="model.pose_map"):
        Trainer(load_config(None, [*settings, "data.scale=0", "model.pose_map=true", fresh]))


def test_pose_map_model_trains_and_its_pipeline_feeds_the_pose(synth_root, tmp_path):
    from xmdpt.training.trainer import Trainer

    run = tmp_path / "run"
    trainer = Trainer(load_config(None, overrides(synth_root, run, "optim.max_steps=2", "model.pose_map=true")))
    assert trainer.denoiser.config.pose_map_channels == 48  # 32x24 images, pixel codec factor 4
    before = trainer.denoiser.pose_embedder.proj.weight.detach().clone()
    assert trainer.train().step == 2
    assert not torch.equal(before, trainer.denoiser.pose_embedder.proj.weight)  # the loss reaches it
    pipe = XMDPTPipeline.from_pretrained(run / "checkpoints" / "step_00000002" / "pipeline")
    ref, pose = torch.zeros(1, 3, 32, 24), torch.zeros(1, 3, 32, 24)
    latents = torch.randn(1, 48, 8, 6, generator=torch.Generator().manual_seed(0))
    a = pipe(ref, pose, num_inference_steps=2, progress=False, output_type="pt", latents=latents).images
    b = pipe(ref, pose + 1, num_inference_steps=2, progress=False, output_type="pt", latents=latents).images
    assert not torch.allclose(a, b)


def test_init_from_adds_reference_attention_to_a_trained_model(synth_root, tmp_path, caplog):
    from conftest import tiny_inputs

    from xmdpt.training.trainer import Trainer

    base = tmp_path / "base"
    Trainer(load_config(None, overrides(synth_root, base, "optim.max_steps=2"))).train()
    start = base / "checkpoints" / "step_00000002"
    saved = XMDPTPipeline.from_pretrained(start / "pipeline")  # the EMA weights

    more = ("model.reference_layers=1", "model.refine_channels=8", f"model.init_from={start}", "optim.max_steps=2")
    with caplog.at_level("INFO", logger="xmdpt.training.trainer"):
        trainer = Trainer(load_config(None, overrides(synth_root, tmp_path / "ref", *more)))
    new = "denoiser.blocks.*.cross_attn, denoiser.reference_memory, denoiser.refiner"
    assert f"newly initialised: {new}" in caplog.text
    # Step 0 computes the saved model's function, learned encoders included.
    x, saved_x = tiny_inputs(trainer.denoiser, batch=2), tiny_inputs(saved.denoiser, batch=2)  # the same draws
    torch.testing.assert_close(trainer.denoiser(**x), saved.denoiser(**saved_x), rtol=0, atol=0)
    for name in ("pose_encoder", "reference_encoder"):
        for key, value in getattr(saved, name).state_dict().items():
            torch.testing.assert_close(getattr(trainer, name).state_dict()[key], value, rtol=0, atol=0)
    proj = trainer.denoiser.blocks[0].cross_attn.proj.weight
    assert not proj.any()
    trainer.train()
    assert proj.abs().sum() > 0  # reference attention trains from there
    assert trainer.denoiser.refiner.conv_out.weight.abs().sum() > 0  # and so does the refiner

    with pytest.raises(InputError, match="do not fit this model"):
        Trainer(
            load_config(
                None, overrides(synth_root, tmp_path / "a", "model.hidden_size=64", f"model.init_from={start}")
            )
        )
    with pytest.raises(InputError, match="cannot read the weights"):
        Trainer(load_config(None, overrides(synth_root, tmp_path / "b", f"model.init_from={tmp_path / 'nowhere'}")))

    # A saved pipeline folder (e.g. the embedded default) is a starting point too: its float16 or float32 weights
    # load into the denoiser and the learned encoders, and the training-only side blocks start afresh.
    (start / "pipeline" / "denoiser" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "moved")
    with pytest.raises(InputError, match="denoiser.*cannot read the weights"):
        Trainer(load_config(None, overrides(synth_root, tmp_path / "c", f"model.init_from={start / 'pipeline'}")))
    (tmp_path / "moved").rename(start / "pipeline" / "denoiser" / "diffusion_pytorch_model.safetensors")
    # what ship_default_model --dtype float16 writes
    copy.deepcopy(saved.denoiser).to(torch.float16).save_pretrained(tmp_path / "half" / "denoiser")
    for name in ("pose_encoder", "reference_encoder", "codec", "scheduler"):
        getattr(saved, name).save_pretrained(tmp_path / "half" / name)
    (tmp_path / "half" / "model_index.json").write_text((start / "pipeline" / "model_index.json").read_text())
    for folder in (start / "pipeline", tmp_path / "half"):
        with caplog.at_level("INFO", logger="xmdpt.training.trainer"):
            caplog.clear()
            trainer = Trainer(
                load_config(None, overrides(synth_root, tmp_path / folder.name, f"model.init_from={folder}"))
            )
        atol = 0 if folder.name == "pipeline" else 2e-2
        x = tiny_inputs(trainer.denoiser, batch=2)
        torch.testing.assert_close(trainer.denoiser(**x), saved.denoiser(**x), rtol=0, atol=atol)
        for name in ("pose_encoder", "reference_encoder"):
            for key, value in getattr(saved, name).state_dict().items():
                torch.testing.assert_close(getattr(trainer, name).state_dict()[key], value, rtol=0, atol=atol)
        assert f"started from {folder}" in caplog.text


def test_a_synthetic_run_reuses_a_set_only_with_its_pattern_scale(tmp_path):
    from xmdpt.data.synthetic import SynthConfig
    from xmdpt.default_model import synthetic_set, write_synthetic_set
    from xmdpt.training.build import ensure_synthetic

    root = tmp_path / "set"
    base = ["data.layout=synthetic", f"data.root={root}", "data.synth_identities=3", "data.size=[32,24]"]
    ensure_synthetic(load_config(None, base))
    # A set written before pattern_cell existed has no such key: it was drawn with the default cells.
    settings = json.loads((root / "synth.json").read_text())
    assert settings.pop("pattern_cell") == [0.025, 0.06]
    (root / "synth.json").write_text(json.dumps(settings))
    ensure_synthetic(load_config(None, base))  # reused
    with pytest.raises(InputError, match="holds another synthetic set"):
        ensure_synthetic(load_config(None, [*base, "data.synth_pattern_cell=[0.08,0.14]"]))  # bolder than that set
    with pytest.raises(InputError, match="pattern_cell"):
        load_config(None, [*base, "data.synth_pattern_cell=[0.2,0.1]"])
    # The range travels with an exported model, so that `xmdpt demo --model` draws the people it was trained on.
    write_synthetic_set(tmp_path, SynthConfig(size=(32, 24), pattern_cell=(0.08, 0.14)))
    assert synthetic_set(tmp_path).pattern_cell == (0.08, 0.14)


def test_bad_samples_are_counted_in_the_data_workers_too(synth_root, tmp_path):
    """Each DataLoader worker holds its own copy of the data set: the skip count travels with the items, so the
    run's summary counts what the workers passed over (the main process's copy sees none of it)."""
    from xmdpt.training.trainer import train

    root = tmp_path / "set"
    shutil.copytree(synth_root, root)
    for path in sorted((root / "train").glob("*.png"))[::2]:  # every other training image corrupt
        path.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    config = load_config(None, [*overrides(root, tmp_path / "run", "optim.max_steps=3"), "data.num_workers=1"])
    train(config)
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["skipped_bad_samples"] > 0
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["skipped_bad_samples"] == summary["skipped_bad_samples"]


def test_help_answers_without_importing_torch():
    """`xmdpt --help` and each command's help must be instant: nothing heavy is imported to print them."""
    code = "import sys, xmdpt.cli; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    for command in ([], ["generate"], ["train"], ["evaluate"], ["serve"], ["demo"], ["convert"], ["pose"]):
        done = subprocess.run([sys.executable, "-m", "xmdpt", *command, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "Usage" in done.stdout, done.stderr


def test_a_full_disk_during_a_checkpoint_is_one_line_exit_4_and_leaves_no_partial_folder(
    synth_root, tmp_path, monkeypatch, capfd
):
    """safetensors reports a full disk as a SafetensorError, not an OSError: it must still be the documented one
    line and exit code 4, with the temporary folder removed and the previous checkpoint intact."""
    from safetensors import SafetensorError

    import xmdpt.training.trainer as trainer_module
    from xmdpt.cli import main

    real_save = trainer_module.save_file

    def save_file(tensors, path, *args, **kwargs):
        if "step_00000004" in str(path):
            raise SafetensorError(
                "Error while serializing: IoError(Os { code: 28, message: No space left on device })"
            )
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_file", save_file)
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / ".tmp_step_00000009_123").mkdir()  # left by a write that was killed earlier
    args = ["train", *overrides(synth_root, run, "optim.max_steps=6", "run.checkpoint_every=2")]
    with pytest.raises(SystemExit) as done:
        main(args)
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert done.value.code == 4 and len(err) == 1 and "No space left" in err[0] and "step_00000002" in err[0]
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002"]  # no .tmp_step_* left


def test_skipping_non_finite_steps_stops_when_they_never_end(synth_root, tmp_path):
    from xmdpt.training.trainer import NonFiniteLoss, Trainer

    extra = ("optim.max_steps=50", "run.checkpoint_every=2", "run.on_nan=skip", "run.max_nan_skips=5")
    trainer = Trainer(load_config(None, overrides(synth_root, tmp_path / "run", *extra)))
    nan_after(trainer, 3)  # every step from the fourth on: as when the weights themselves are no longer finite
    with pytest.raises(NonFiniteLoss, match="5 steps in a row.*step_00000002"):
        trainer.train()
    assert trainer.step == 3 and trainer.skipped_nan == 5


# ---- training speed-ups -----------------------------------------------------------------------------------------


def test_routed_self_aligned_run_saves_its_projector_resumes_exactly_and_exports_the_plain_model(synth_root, tmp_path):
    """Self-alignment's projector is training state: in model/ema.safetensors and the optimizer, restored on resume
    (a resumed run equals the straight one bit for bit), never in the exported pipeline."""
    from xmdpt.training.trainer import train

    extra = [
        "model.depth=3",
        "objective.route_ratio=0.5",
        "objective.self_align_weight=0.5",
        "objective.self_align_blocks=[0,1]",
        "objective.align_width=16",
        "run.checkpoint_every=2",
    ]
    train(load_config(None, overrides(synth_root, tmp_path / "straight", "optim.max_steps=4", *extra)))
    train(load_config(None, overrides(synth_root, tmp_path / "resumed", "optim.max_steps=2", *extra)))
    train(load_config(None, overrides(synth_root, tmp_path / "resumed", "optim.max_steps=4", *extra)), resume=True)
    straight = weights(tmp_path / "straight")
    assert "alignment.self.projector.0.weight" in straight
    assert "module.alignment.self.projector.0.weight" in ema_at(tmp_path / "straight", 4)
    assert_same_tensors(straight, weights(tmp_path / "resumed"))
    pipe = XMDPTPipeline.from_pretrained(tmp_path / "straight" / "checkpoints" / "step_00000004" / "pipeline")
    plain = tmp_path / "plain"
    train(load_config(None, overrides(synth_root, plain, "optim.max_steps=1", "model.depth=3")))
    plain_pipe = XMDPTPipeline.from_pretrained(plain / "checkpoints" / "step_00000001" / "pipeline")
    config_of = lambda run, step: (run / "checkpoints" / step / "pipeline" / "denoiser" / "config.json").read_text()  # noqa: E731
    assert config_of(tmp_path / "straight", "step_00000004") == config_of(plain, "step_00000001")
    assert pipe.denoiser.state_dict().keys() == plain_pipe.denoiser.state_dict().keys()
    # A run started from that checkpoint without alignment takes the denoiser and leaves the projector behind.
    started = tmp_path / "started"
    init = f"model.init_from={tmp_path / 'straight' / 'checkpoints' / 'step_00000004'}"
    train(load_config(None, overrides(synth_root, started, "optim.max_steps=1", "model.depth=3", init)))
    assert not any(k.startswith("alignment.") for k in weights(started))


def test_repa_trains_on_the_frozen_encoders_target_features_with_and_without_the_cache(synth_root, tmp_path, tiny_hub):
    from xmdpt.training.trainer import Trainer

    common = [*published_setup(tiny_hub), "objective.repa_weight=0.5", "objective.repa_block=0"]
    common += ["objective.align_width=16", "data.scale=0"]
    config = load_config(None, [*overrides(synth_root, tmp_path / "plain", "optim.max_steps=1"), *common])
    assert Trainer(config).train().step == 1
    cached = [*common, "data.cache_features=true", f"data.cache_dir={tmp_path / 'cache'}"]
    trainer = Trainer(load_config(None, [*overrides(synth_root, tmp_path / "cached", "optim.max_steps=1"), *cached]))
    item = trainer.dataset[0]
    assert item["target_features"].shape == item["reference_features"].shape  # the target's, from the cache
    assert trainer.train().step == 1
    assert "alignment.repa.projector.0.weight" in weights(tmp_path / "cached")


def test_bf16_mixed_precision_runs_the_cpu_step_under_bf16_autocast(synth_root, tmp_path):
    """optim.mixed_precision=bf16 on a CPU: the step's matrix products run in bfloat16 (Accelerate's autocast on the
    CPU), the weights and their gradients stay float32."""
    from xmdpt.training.trainer import Trainer

    config = load_config(
        None, overrides(synth_root, tmp_path / "run", "optim.max_steps=1", "optim.mixed_precision=bf16")
    )
    trainer = Trainer(config)
    seen = []
    qkv = trainer.denoiser.blocks[0].attn.qkv
    handle = qkv.register_forward_hook(lambda m, a, out: seen.append((out.dtype, torch.is_autocast_enabled("cpu"))))
    assert trainer.train().step == 1
    handle.remove()
    assert seen and all(entry == (torch.bfloat16, True) for entry in seen)
    assert qkv.weight.dtype == torch.float32
