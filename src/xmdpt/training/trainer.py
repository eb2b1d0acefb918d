"""The training loop on Hugging Face Accelerate: one CPU to many GPUs, exact resume, nothing lost.

Determinism is by construction rather than by saved generator states: the data order is a permutation per epoch
seeded by (seed, epoch); each sample's augmentation is seeded by (seed, epoch, index); each micro-batch's diffusion
draws (timesteps, noise, dropout, masks) are drawn for the whole global batch from (seed, micro-batch) and sliced per
process. So a resumed run continues bit for bit from its step, and N processes see the samples and randomness of one
process on the same global batch.

Checkpoints (`out_dir/checkpoints/step_XXXXXXXX/`) are written to a temporary folder and renamed into place:
`trainer_state.json` (step, config, counters, LR schedule), `model.safetensors`, `ema.safetensors`,
`optimizer.safetensors` + `optimizer.json`, and `pipeline/`, the EMA weights as an `XMDPTPipeline` folder that the
sampling side loads directly.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from xmdpt.conditioning import encode_features
from xmdpt.default_model import write_synthetic_set
from xmdpt.diffusion import AlignmentInputs, LossDraws, RepaTerm
from xmdpt.errors import InputError, describe
from xmdpt.generation import Job, generate_batches
from xmdpt.models.xmdpt import rename_legacy_keys
from xmdpt.pipeline import XMDPTPipeline, make_sampling_scheduler, to_pil
from xmdpt.training.build import (
    build_codec,
    build_dataset,
    build_denoiser,
    build_encoders,
    build_objective,
    synth_config,
)
from xmdpt.training.config import TrainConfig

log = logging.getLogger(__name__)

#################################################################################
#                        Deterministic, resumable data order                    #
#################################################################################


class SeededItems(Dataset):
    """Wraps a data set whose augmentation draws from torch's global generator: item `epoch * n + index` is drawn
    under the seed (seed, epoch, index), whatever process, worker or resume serves it."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict:
        epoch, index = divmod(key, len(self.dataset))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.dataset[index]


class GlobalBatchSampler(Sampler[list[int]]):
    """This process's slice of global micro-batches `start, start + 1, ...` of an endless stream of per-epoch
    permutations: item keys are `epoch * n + index` (see `SeededItems`). Endless, because a skipped step (a
    non-finite loss) consumes a batch without counting; the loop stops at `max_steps`."""

    def __init__(self, n: int, global_batch: int, seed: int, start: int, rank: int, world: int):
        if global_batch % world:
            raise InputError(f"the micro-batch of {global_batch} does not split over {world} processes")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.start, self.rank, self.local = start, rank, global_batch // world
        self._perm: tuple[int, torch.Tensor] | None = None

    def _key(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)))
        return epoch * self.n + int(self._perm[1][offset])

    def __iter__(self):
        for batch in itertools.count(self.start):
            first = batch * self.global_batch + self.rank * self.local
            yield [self._key(p) for p in range(first, first + self.local)]


def draw_seed(seed: int, micro_batch: int) -> int:
    return (seed * 7_919 + 17) * 1_000_000_007 + micro_batch


#################################################################################
#                                 The training step                             #
#################################################################################


class TrainStep(nn.Module):
    """What DDP wraps: the trainable parts (the denoiser, any learned encoders, the alignment terms' projectors) and
    the loss. Frozen encoders, and the EMA model that self-alignment learns from, are kept outside the module tree so
    that DDP neither broadcasts nor wraps them."""

    def __init__(self, denoiser: nn.Module, pose_encoder: nn.Module, reference_encoder: nn.Module, objective):
        super().__init__()
        self.trainable = nn.ModuleDict({"denoiser": denoiser})
        self.frozen: dict[str, nn.Module] = {}
        for name, encoder in (("pose_encoder", pose_encoder), ("reference_encoder", reference_encoder)):
            if any(p.requires_grad for p in encoder.parameters()):
                self.trainable[name] = encoder
            else:
                self.frozen[name] = encoder
        if objective.alignment_terms:  # registered last: without them the parameter order is what it was
            self.trainable["alignment"] = nn.ModuleDict({term.name: term for term in objective.alignment_terms})
        self.objective = objective
        self.teacher: dict[str, nn.Module] = {}  # {"denoiser": the EMA denoiser}, set by the trainer

    def encoder(self, name: str) -> nn.Module:
        return self.trainable[name] if name in self.trainable else self.frozen[name]

    def forward(
        self,
        target_latents,
        reference_latent,
        pose_images,
        reference_images,
        draws: LossDraws,
        features=None,
        target_features=None,
    ):
        """target_features: the reference encoder's features of the target image, for REPA."""
        if features is None:  # else from the feature cache
            features = encode_features(
                self.encoder("pose_encoder"), self.encoder("reference_encoder"), reference_images, pose_images
            )
        denoiser = self.trainable["denoiser"]
        pose = pose_images if denoiser.pose_embedder is not None else None
        conditions = denoiser.encode_conditions(*features, reference_latent, pose)  # once for both passes
        alignment = None
        if self.objective.alignment_terms:
            teacher = self.teacher.get("denoiser")
            teacher_conditions = None
            if teacher is not None:
                with torch.no_grad():  # the EMA's own aggregation of the same features
                    detached = [f.detach() for f in features]
                    teacher_conditions = teacher.encode_conditions(*detached, reference_latent, pose)
            alignment = AlignmentInputs(target_features, teacher, teacher_conditions)
        out = self.objective(denoiser, target_latents, conditions, draws=draws, alignment=alignment)
        zeros = torch.zeros_like(out.full)
        return out.loss, out.full, out.masked if out.masked is not None else zeros


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    interrupted: bool = False


#################################################################################
#                                  The trainer                                  #
#################################################################################


@contextmanager
def stop_on_sigterm():
    """While training, SIGTERM (a cluster's pre-emption or time limit, `kill`, torchrun passing one on) asks the
    loop to stop after the current step and write a checkpoint, as Ctrl-C does, instead of dying between
    checkpoints. Yields the flag the loop polls. Outside the main thread (where handlers cannot be set) it is
    never raised."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        requested.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGTERM, previous)


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM: a cluster's time limit or `scancel` signals every process of the job, and
    a worker that dies of it takes the run down before the main process can write its checkpoint. The main process
    shuts its workers down when it stops (and they exit by themselves if it dies)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = config
        self.out_dir = Path(config.run.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        o, r = config.optim, config.run
        cpu = r.device == "cpu" or (r.device == "auto" and not torch.cuda.is_available())
        self.accelerator = Accelerator(
            cpu=cpu,
            mixed_precision="no" if o.mixed_precision == "fp32" else o.mixed_precision,
            gradient_accumulation_steps=o.grad_accum,
            log_with="tensorboard",
            project_dir=str(self.out_dir),
        )
        acc = self.accelerator
        has_run = (self.ckpt_dir / "latest").is_file()
        if has_run and not resume:
            raise InputError(
                f"{self.out_dir} holds the checkpoints of an earlier run: add --resume to go on with it, or choose "
                "another run.out_dir"
            )
        if acc.is_main_process:
            preflight(self.out_dir)
            remove_partial_checkpoints(self.ckpt_dir)
        acc.wait_for_everyone()

        torch.manual_seed(r.seed)  # the initial weights
        self.pose_encoder, self.reference_encoder = build_encoders(config)
        self.codec = build_codec(config).to(acc.device)
        self.denoiser = build_denoiser(config, self.codec, self.pose_encoder, self.reference_encoder)
        self.objective = build_objective(config, self.codec, self.denoiser, self.reference_encoder)
        self.step_module = TrainStep(self.denoiser, self.pose_encoder, self.reference_encoder, self.objective)
        for encoder in self.step_module.frozen.values():
            encoder.to(acc.device)
        if config.model.init_from and not has_run:  # a resumed run has its own weights
            self.initialise_from(Path(config.model.init_from))
        self.ema = AveragedModel(self.step_module.trainable, multi_avg_fn=get_ema_multi_avg_fn(o.ema_decay))
        self.step_module.teacher["denoiser"] = self.ema.module["denoiser"]  # self-alignment's teacher
        self.optimizer = torch.optim.AdamW(
            self.step_module.trainable.parameters(), lr=o.lr, weight_decay=o.weight_decay
        )
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.step, self.skipped_nan, self.skipped_bad, self.last_checkpoint = 0, 0, 0, None
        if resume:
            self.resume()
        self.step_module, self.optimizer = acc.prepare(self.step_module, self.optimizer)
        self.ema.to(acc.device)

        self.dataset = build_dataset(config, "train", train=True)
        if len(self.dataset) == 0:
            raise InputError(f"{config.data.root}: the training split has no pairs")
        if config.data.cache_features:
            self.dataset = self.feature_cache()
        self.val_items = self.validation_items()
        if acc.is_main_process:
            (self.out_dir / "config.yaml").write_text(config.to_yaml())
            acc.init_trackers("tb", config=flat_config(config))
        log.info(
            "X-MDPT %s parameters, %d training pairs, %d process(es) on %s",
            f"{self.denoiser.num_parameters():,}",
            len(self.dataset),
            acc.num_processes,
            acc.device,
        )

    # ---- schedule --------------------------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """The learning rate's multiplier after `step` updates: a linear warm-up, constant, then a linear
        cool-down to 0 over the last `decay_steps` (warmup-stable-decay, Hu et al. 2024, Haegele et al. 2024). It
        is a function of the step and the config alone, so a run resumed with a larger `max_steps` is the run that
        had it all along: train at the constant rate for as long as it helps, then resume once more to cool down."""
        o = self.config.optim
        warmup = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
        decay = min(1.0, (o.max_steps - step) / o.decay_steps) if o.decay_steps > 0 else 1.0
        return max(0.0, min(warmup, decay))

    def loader(self) -> DataLoader:
        o, acc = self.config.optim, self.accelerator
        micro = o.batch_size // o.grad_accum
        sampler = GlobalBatchSampler(
            len(self.dataset),
            micro,
            self.config.run.seed,
            start=self.step * o.grad_accum,
            rank=acc.process_index,
            world=acc.num_processes,
        )
        workers = self.config.data.num_workers
        return DataLoader(
            SeededItems(self.dataset, self.config.run.seed),
            batch_sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=ignore_sigterm,
        )

    # ---- the loop --------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Train to optim.max_steps. Ctrl-C or SIGTERM stops early with a checkpoint of the last whole step."""
        total, main = self.config.optim.max_steps, self.accelerator.is_main_process
        bar = tqdm(total=total, initial=self.step, disable=not main, desc="train", unit="step")
        self.step_module.train()
        try:
            with stop_on_sigterm() as stop:
                return self._loop(bar, stop)
        except KeyboardInterrupt:
            return self._interrupted(bar)
        finally:
            bar.close()  # ends the bar's line, so that an error message stands on a line of its own

    def _interrupted(self, bar) -> TrainResult:
        log.warning("interrupted at step %d: writing a checkpoint", self.step)
        if self.step and (self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:08d}")):
            self.save_checkpoint()
        bar.close()
        return TrainResult(self.step, self.last_checkpoint, interrupted=True)

    def _stop_requested(self, stop: threading.Event) -> bool:
        """Whether any process was sent SIGTERM; every process must agree, or the others would wait forever in
        the next step's gradient all-reduce."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return stop.is_set()
        flag = torch.tensor([float(stop.is_set())], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)

    def _loop(self, bar: tqdm, stop: threading.Event) -> TrainResult:
        o, r, acc = self.config.optim, self.config.run, self.accelerator
        micro = o.batch_size // o.grad_accum
        local = micro // acc.num_processes
        window_start, window_samples = time.perf_counter(), 0
        micro_index = self.step * o.grad_accum
        nan_in_a_row = 0
        for batch in self.loader():
            if self.step >= o.max_steps:  # done: a SIGTERM now changes nothing
                break
            if self._stop_requested(stop):  # checked before every micro-batch, NaN-skipped ones included
                return self._interrupted(bar)
            draws = self.objective.draw(
                (micro, self.denoiser.config.in_channels, *self.denoiser.config.sample_size),
                self.denoiser.num_tokens,
                torch.Generator().manual_seed(draw_seed(r.seed, micro_index)),
            )
            rank = acc.process_index
            draws = draws[rank * local : (rank + 1) * local].to(acc.device)
            vae_generator = torch.Generator().manual_seed(draw_seed(r.seed + rank + 1, micro_index))
            micro_index += 1
            if "skipped" in batch:  # bad samples the data set passed over for this batch, in whichever worker
                self.skipped_bad += int(batch["skipped"].sum())
            with acc.accumulate(self.step_module):
                loss, full, masked = self.forward(batch, draws, vae_generator)
                if not self.all_finite(loss):
                    if r.on_nan == "stop":
                        raise NonFiniteLoss(
                            f"non-finite loss at step {self.step + 1}; stopped. The last good checkpoint is "
                            f"{self.last_checkpoint or 'none (no checkpoint was written yet)'}"
                        )
                    self.skipped_nan += 1
                    nan_in_a_row += 1
                    if nan_in_a_row >= r.max_nan_skips:
                        raise NonFiniteLoss(
                            f"{nan_in_a_row} steps in a row had a non-finite loss (from step {self.step + 1}): the "
                            "weights themselves are probably no longer finite; stopped. The last good checkpoint is "
                            f"{self.last_checkpoint or 'none (no checkpoint was written yet)'}"
                        )
                    log.warning(
                        "non-finite loss at step %d: step skipped (%d so far)", self.step + 1, self.skipped_nan
                    )
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                nan_in_a_row = 0
                acc.backward(loss)
                if acc.sync_gradients and o.grad_clip:
                    acc.clip_grad_norm_(self.step_module.parameters(), o.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            window_samples += micro
            if not acc.sync_gradients:
                continue
            self.step += 1
            self.lr_schedule.step()
            self.update_ema()
            bar.update(1)
            if self.step % r.log_every == 0 or self.step == o.max_steps:
                elapsed = time.perf_counter() - window_start
                self.log_scalars(loss, full, masked, window_samples / max(elapsed, 1e-9))
                bar.set_postfix(loss=f"{loss.item():.4f}")
                window_start, window_samples = time.perf_counter(), 0
            if r.sample_every and self.step % r.sample_every == 0:
                self.sample_grid()
            if self.step % r.checkpoint_every == 0 or self.step == o.max_steps:
                self.save_checkpoint()
        bar.close()
        self.finish()
        return TrainResult(self.step, self.last_checkpoint)

    def forward(self, batch: dict, draws: LossDraws, vae_generator: torch.Generator):
        device = self.accelerator.device
        if "target_latent_mean" in batch:  # from the feature cache: sample the posterior here, as the VAE would
            mean, std = batch["target_latent_mean"], batch["target_latent_std"]
            target_latents = (mean + std * torch.randn(mean.shape, generator=vae_generator)).to(device)
            mean, std = batch["reference_latent"], batch["reference_latent_std"]
            reference_latent = (mean + std * torch.randn(mean.shape, generator=vae_generator)).to(device)
            features = (batch["pose_features"].to(device), batch["reference_features"].to(device))
            target_features = batch["target_features"].to(device) if "target_features" in batch else None
            with self.accelerator.autocast():
                return self.step_module(target_latents, reference_latent, None, None, draws, features, target_features)
        target = batch["target_image"].to(device)
        reference = batch["reference_image"].to(device)
        with torch.no_grad():
            target_latents = self.codec.encode(target, sample=True, generator=vae_generator).float()
            # A posterior sample for the reference too, as the public loop encodes both (sampling uses the mean).
            reference_latent = self.codec.encode(reference, sample=True, generator=vae_generator).float()
        with self.accelerator.autocast():
            target_features = None
            if self.needs_target_features:  # REPA without the cache: one more frozen encoder pass
                with torch.no_grad():
                    encoder = self.accelerator.unwrap_model(self.step_module).encoder("reference_encoder")
                    target_features = encoder((target + 1) / 2)  # the range `encode_features` feeds it
            return self.step_module(
                target_latents, reference_latent, batch["target_pose"].to(device), reference, draws, None,
                target_features,
            )  # fmt: skip

    @property
    def needs_target_features(self) -> bool:
        return any(isinstance(term, RepaTerm) for term in self.objective.alignment_terms)

    def feature_cache(self) -> Dataset:
        """Build (once, on the main process) and serve the pre-computed frozen outputs; see `cache.py`."""
        from xmdpt.training.cache import CachedPairs, build_cache, cache_key

        d, acc = self.config.data, self.accelerator
        step_module = acc.unwrap_model(self.step_module)
        if set(step_module.trainable) - {"denoiser", "alignment"}:
            raise InputError("data.cache_features needs frozen encoders (conditioning.encoder=dinov2)")
        if self.denoiser.pose_embedder is not None:
            raise InputError("data.cache_features does not hold the rendered poses that model.pose_map needs")
        folder = Path(d.cache_dir) if d.cache_dir else Path(d.root) / ".xmdpt-cache" / cache_key(self.config)
        if acc.is_main_process:
            plain = build_dataset(self.config, "train", train=False)
            frozen = step_module.frozen
            build_cache(plain, folder, self.codec, frozen["pose_encoder"], frozen["reference_encoder"])
        acc.wait_for_everyone()
        return CachedPairs(self.dataset, folder, target_features=self.needs_target_features)

    def all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.isfinite(loss.detach()).float().reshape(1)
        return bool(self.accelerator.gather(flag).min() > 0)

    def update_ema(self) -> None:
        if self.step >= self.config.optim.ema_start:
            self.ema.update_parameters(self.accelerator.unwrap_model(self.step_module).trainable)

    def log_scalars(self, loss, full, masked, samples_per_second: float) -> None:
        acc = self.accelerator
        values = {
            "loss/total": acc.gather(loss.detach().reshape(1)).mean().item(),
            "loss/full_pass": acc.gather(full.detach()).mean().item(),
            "loss/masked_pass": acc.gather(masked.detach()).mean().item(),
            "lr": self.lr_schedule.get_last_lr()[0],
            "throughput/samples_per_second": samples_per_second,
            "data/skipped_bad_samples": float(self.bad_samples_total()),
            "data/skipped_nan_steps": float(self.skipped_nan),
        }
        acc.log(values, step=self.step)

    # ---- EMA samples on fixed validation pairs ---------------------------------------------------------------
    def validation_items(self) -> list[dict]:
        n = self.config.run.sample_pairs
        if not self.config.run.sample_every or n <= 0:
            return []
        try:
            dataset = build_dataset(self.config, "test", train=False)
        except InputError:
            dataset = build_dataset(self.config, "train", train=False)
        return [dataset[i] for i in range(min(n, len(dataset)))]

    def ema_pipeline(self) -> XMDPTPipeline:
        ema = self.ema.module
        frozen = self.accelerator.unwrap_model(self.step_module).frozen
        pick = lambda name: ema[name] if name in ema else frozen[name]  # noqa: E731
        scheduler = make_sampling_scheduler("ddim", self.objective.scheduler.config)
        components = (ema["denoiser"], self.codec, pick("pose_encoder"), pick("reference_encoder"), scheduler)
        return XMDPTPipeline(*components, num_inference_steps=self.config.run.sample_steps)

    @torch.no_grad()
    def sample_grid(self) -> None:
        """EMA samples of the validation pairs (reference | pose | generated | target), saved and logged."""
        acc = self.accelerator
        if acc.is_main_process and self.val_items:
            pipe = self.ema_pipeline()
            jobs = [
                Job(str(i), self.config.run.seed + i, lambda v=v: (v["reference_image"][None], v["target_pose"][None]))
                for i, v in enumerate(self.val_items)
            ]
            results = generate_batches(pipe, jobs, pipe.sampling_settings(), batch_size=len(jobs), progress=False)
            images = torch.stack([result.image.float().cpu() for result in results])
            ref = torch.stack([v["reference_image"] for v in self.val_items])
            pose = torch.stack([v["target_pose"] for v in self.val_items])
            target = torch.stack([v["target_image"] for v in self.val_items])
            rows = torch.stack([ref, pose * 2 - 1, images, target], dim=1).flatten(0, 1)  # (4N, 3, H, W)
            grid = make_grid(rows, columns=4)
            path = self.out_dir / "samples" / f"step_{self.step:08d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            to_pil(grid[None])[0].save(path)
            tracker = acc.get_tracker("tensorboard", unwrap=True)
            tracker.add_image("samples/reference|pose|generated|target", (grid + 1) / 2, self.step)
            self.ema.module.train()
        acc.wait_for_everyone()

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def bad_samples_total(self) -> int:
        """Bad samples skipped so far by all processes (a collective: every process must call it)."""
        acc = self.accelerator
        return int(acc.reduce(torch.tensor([float(self.skipped_bad)], device=acc.device), reduction="sum").item())

    def save_checkpoint(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        bad_samples = self.bad_samples_total()
        if acc.is_main_process:
            final = self.ckpt_dir / f"step_{self.step:08d}"
            tmp = self.ckpt_dir / f".tmp_step_{self.step:08d}_{os.getpid()}"
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                self.write_checkpoint(tmp, bad_samples)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)  # atomic: a checkpoint folder is either whole or absent
                atomic_write_text(self.ckpt_dir / "latest", final.name + "\n")
            except (OSError, SafetensorError) as err:  # a full disk is a SafetensorError from save_file
                shutil.rmtree(tmp, ignore_errors=True)
                raise OSError(
                    f"could not write checkpoint {final} ({getattr(err, 'strerror', None) or err}); "
                    f"the previous one ({self.last_checkpoint or 'none'}) is intact"
                ) from err
            self.prune()
            log.info("checkpoint %s", final)
        self.last_checkpoint = self.ckpt_dir / f"step_{self.step:08d}"
        acc.wait_for_everyone()

    def write_checkpoint(self, folder: Path, bad_samples: int) -> None:
        trainable = self.accelerator.unwrap_model(self.step_module).trainable
        save_file(contiguous(trainable.state_dict()), folder / "model.safetensors")
        ema_state = contiguous(self.ema.state_dict())
        save_file(ema_state, folder / "ema.safetensors")
        tensors, structure = flatten_optimizer(self.optimizer.state_dict())
        save_file(tensors, folder / "optimizer.safetensors")
        (folder / "optimizer.json").write_text(json.dumps(structure))
        state = {
            "step": self.step,
            "lr_schedule": self.lr_schedule.state_dict(),
            "skipped_nan_steps": self.skipped_nan,
            "skipped_bad_samples": bad_samples,
            "config": self.config.to_dict(),
        }
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=1))
        self.ema_pipeline().save_pretrained(folder / "pipeline")
        if self.config.data.layout == "synthetic":  # `xmdpt demo --model .../pipeline` finds the held-out people
            write_synthetic_set(folder / "pipeline", synth_config(self.config))

    def prune(self) -> None:
        keep = self.config.run.keep_last
        done = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir())
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> None:
        latest = self.ckpt_dir / "latest"
        if not latest.is_file():
            log.info("no checkpoint in %s: starting from scratch", self.ckpt_dir)
            return
        folder = self.ckpt_dir / latest.read_text().strip()
        try:
            state = json.loads((folder / "trainer_state.json").read_text())
            self.step_module.trainable.load_state_dict(load_file(folder / "model.safetensors"))
            self.ema.load_state_dict(load_file(folder / "ema.safetensors"))
            structure = json.loads((folder / "optimizer.json").read_text())
            self.optimizer.load_state_dict(unflatten_optimizer(load_file(folder / "optimizer.safetensors"), structure))
            check_optimizer_shapes(self.optimizer)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
            raise InputError(f"{folder}: cannot resume from this checkpoint ({str(err).splitlines()[0]})") from None
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.step, self.skipped_nan = state["step"], state.get("skipped_nan_steps", 0)
        # Each process counts its own share and the checkpoint holds their sum: on resume the main process continues
        # from it and the others from 0, so the sum over processes goes on from the checkpoint's.
        self.skipped_bad = state.get("skipped_bad_samples", 0) if self.accelerator.is_main_process else 0
        # The rate follows this config (its lr, max_steps and decay_steps), not the one the checkpoint was made with.
        self.lr_schedule.base_lrs = [self.config.optim.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.optim.lr * self.lr_factor(self.step)
        self.last_checkpoint = folder
        log.info("resumed from %s at step %d", folder, self.step)

    def initialise_from(self, folder: Path) -> None:
        """Load a checkpoint's EMA weights, or a saved pipeline's weights (a folder with model_index.json, e.g. the
        embedded default), into the trainable modules (before the EMA copies them). Every saved tensor must fit,
        and a pipeline must hold every trainable component; submodules the source lacks (reference attention, the
        refiner, a pipeline's training-only side blocks) keep their initialisation, which for reference attention
        and the refiner computes the saved model's function exactly (see XMDPTBlock)."""
        trainable = self.step_module.trainable
        state = {}
        if (folder / "model_index.json").is_file():
            for name, module in trainable.items():  # the pipeline's components are named as the trainable modules
                if name == "alignment":  # training's projectors: never in a pipeline
                    continue
                try:  # from_pretrained reads any dtype, sharded or .bin weights the way the pipeline loads them
                    saved = type(module).from_pretrained(folder, subfolder=name).state_dict()
                except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
                    raise InputError(
                        f"{folder / name}: cannot read the weights to start from ({describe(err)})"
                    ) from None
                state.update({f"{name}.{k}": v.float() for k, v in saved.items()})
        else:
            path = folder / "ema.safetensors"
            try:
                saved = load_file(path)
            except (OSError, SafetensorError) as err:
                first = str(err).splitlines()[0]
                raise InputError(f"{path}: cannot read the weights to start from ({first})") from None
            state = {k.removeprefix("module."): v for k, v in saved.items() if k.startswith("module.")}
            # The alignment projectors are a training aid of that run: this one starts its own (if it has any).
            state = {k: v for k, v in state.items() if not k.startswith("alignment.")}
            rename_legacy_keys(state, "denoiser.")  # a run saved before the paper's modules were classes
        own = trainable.state_dict()
        misfits = [k for k in state if k not in own or own[k].shape != state[k].shape]
        if misfits or not state:
            first = misfits[0] if misfits else "no weights"
            raise InputError(f"{folder}: its weights do not fit this model ({first}; {len(misfits)} tensors)")
        missing = trainable.load_state_dict(state, strict=False).missing_keys
        new = new_modules(missing, state)
        log.info("started from %s; newly initialised: %s", folder, ", ".join(new) or "nothing")

    def finish(self) -> None:
        """Check that every process holds the same weights, and write the run summary."""
        acc = self.accelerator
        weights = acc.unwrap_model(self.step_module).trainable
        checksum = torch.stack([p.detach().double().sum() for p in weights.parameters()]).sum().reshape(1)
        sums = acc.gather(checksum.to(acc.device)).cpu()
        total_bad = self.bad_samples_total()
        if acc.is_main_process:
            summary = {
                "step": self.step,
                "processes": acc.num_processes,
                "ranks_agree": bool(torch.all(sums == sums[0])),
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "skipped_nan_steps": self.skipped_nan,
                "skipped_bad_samples": total_bad,
            }
            atomic_write_text(self.out_dir / "run_summary.json", json.dumps(summary, indent=1) + "\n")
            if not summary["ranks_agree"]:
                log.error("the processes hold different weights: %s", sums.tolist())
            if total_bad:
                log.warning("%d bad samples were skipped", total_bad)

    def close(self) -> None:
        """Release the wrapped model before the process group goes: a DDP reducer that outlives its gloo group is
        torn down at interpreter exit and can abort there ("terminate called without an active exception")."""
        acc = self.accelerator
        self.step_module = self.optimizer = self.lr_schedule = self.ema = None
        acc.free_memory()
        gc.collect()
        acc.wait_for_everyone()
        acc.end_training()


#################################################################################
#                                    Helpers                                    #
#################################################################################


def preflight(out_dir: Path) -> None:
    """Fail before training, not at the first checkpoint: the run folder must be writable."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_test_{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as err:
        raise InputError(f"{out_dir}: cannot write the run folder ({err.strerror or err})") from None


def remove_partial_checkpoints(ckpt_dir: Path) -> None:
    """Temporary checkpoint folders left by a write that was killed or ran out of disk: never a checkpoint (the
    rename into place is the commit), so they go at the next start instead of piling up."""
    for partial in sorted(ckpt_dir.glob(".tmp_step_*")):
        shutil.rmtree(partial, ignore_errors=True)
        log.info("removed %s, an unfinished checkpoint write", partial)


def check_free_space(out_dir: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(out_dir).free
    if free < needed_bytes:
        raise InputError(
            f"{out_dir}: {free / 2**30:.1f} GiB free, a checkpoint needs about {needed_bytes / 2**30:.1f} GiB"
        )


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def contiguous(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}


def new_modules(missing: list[str], saved: dict) -> list[str]:
    """For each key in `missing`, the outermost module that `saved` has no tensor under, block indices folded to
    `*` ("denoiser.blocks.*.cross_attn" for "denoiser.blocks.3.cross_attn.proj.weight"); sorted, without repeats."""
    fold = lambda k: re.sub(r"\.\d+(?=\.)", ".*", k).split(".")  # noqa: E731
    known = {".".join(parts[:i]) for parts in map(fold, saved) for i in range(1, len(parts))}  # once, not per key
    heads = set()
    for key in missing:
        parts = fold(key)
        heads.add(next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in known), key))
    return sorted(heads)


def check_optimizer_shapes(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer states name parameters by position: a checkpoint of another parameter layout would load moments
    onto the wrong tensors. Refuse it (`model.init_from` starts a new run from its weights instead)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params:
        for name, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape != param.shape:
                raise ValueError(
                    f"optimizer state {name} of shape {tuple(value.shape)} for a {tuple(param.shape)} weight; "
                    "start a new run from it with model.init_from"
                )


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict as safetensors tensors + a JSON structure (no pickle)."""
    tensors, per_param = {}, {}
    for index, values in state["state"].items():
        per_param[str(index)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
                per_param[str(index)][key] = None
            else:
                per_param[str(index)][key] = value
    return tensors, {"state": per_param, "param_groups": state["param_groups"]}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state = {}
    for index, values in structure["state"].items():
        state[int(index)] = {k: tensors[f"{index}.{k}"] if v is None else v for k, v in values.items()}
    return {"state": state, "param_groups": structure["param_groups"]}


def make_grid(images: torch.Tensor, columns: int, pad: int = 2) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (3, rows * (H + pad), columns * (W + pad)) on a white background."""
    from torchvision.utils import make_grid as tv_grid

    return tv_grid(images, nrow=columns, padding=pad, pad_value=1.0)


def flat_config(config: TrainConfig) -> dict:
    out = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            out[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Build a trainer from the config and run it to `optim.max_steps`."""
    trainer = Trainer(config, resume=resume)
    if trainer.step >= config.optim.max_steps:
        log.info("already at step %d of %d", trainer.step, config.optim.max_steps)
        return TrainResult(trainer.step, trainer.last_checkpoint)
    if trainer.accelerator.is_main_process:
        params = sum(p.numel() for p in trainer.step_module.parameters())
        check_free_space(trainer.out_dir, params * 4 * 6)  # weights, EMA, 2 Adam moments, pipeline, margin
    result = trainer.train()
    trainer.close()
    return result
