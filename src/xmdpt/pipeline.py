"""XMDPTPipeline: the sampling loop (a diffusers `DiffusionPipeline`).

Components: the denoiser (`XMDPT`), a latent codec (`VAECodec` or `PixelCodec`), a pose encoder and a reference
encoder (`DinoV2Encoder` or `LearnedImageEncoder`), and any diffusers scheduler (DDIM as published, DPM-Solver++,
DDPM), swappable with `Scheduler.from_config(pipe.scheduler.config)` or `make_sampling_scheduler`.

Two wastes of the public code are gone, with identical outputs (tests/test_pipeline.py proves it):
- the conditional and unconditional passes of classifier-free guidance run as one batched forward;
- everything that depends only on the reference and the pose (encoder features, the reference latent, the
  aggregation vector y, the memory of reference attention) is computed once per image instead of once per step,
  and the reference tokens are no longer pushed through every block at every step (only the training-only masked
  pass uses them).
`public_schedule=True` reproduces the public code's schedule of work, for benchmarks and equivalence tests.
Beyond the paper, `guidance_interval=(lo, hi)` applies guidance only at timesteps in [lo, hi] (Kynkaenniemi et al.
2024, "Applying Guidance in a Limited Interval"): elsewhere a step is one conditional pass, so it also saves work
(except with `public_schedule=True`, which runs both passes at every step, as the public code does).
Turning photos, paths, keypoint files and driving photos into the model's tensors is `xmdpt.inputs`'s job.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import PIL.Image
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.utils import BaseOutput

from xmdpt.errors import InputError
from xmdpt.guidance import check_guidance_interval
from xmdpt.inputs import Fit, ImageInput, PoseInput, PoseReader, prepare_inputs
from xmdpt.models.xmdpt import XMDPT
from xmdpt.pose.extract import PoseExtractor

SAMPLERS = ("ddim", "dpmsolver++", "ddpm")


def make_sampling_scheduler(
    name: str, train_config, learn_sigma: bool | None = None
) -> DDIMScheduler | DPMSolverMultistepScheduler | DDPMScheduler:
    """A sampler on the training schedule. "ddim" (eta 0, no clipping, as published) and "dpmsolver++" use linspace
    spacing, whose timesteps (999, 979, ..., 0 for 50 steps) are those of the public code's respaced DDIM.
    `learn_sigma` (the denoiser's, as `XMDPTPipeline.set_sampler` passes it) decides DDPM's variance: learned-range
    or fixed; None keeps `train_config`'s, which a DDIM or DPM-Solver config no longer holds."""
    if name == "ddim":
        return DDIMScheduler.from_config(train_config, timestep_spacing="linspace", clip_sample=False)
    if name == "dpmsolver++":
        # variance_type is cleared: this pipeline hands the sampler only the C prediction channels.
        return DPMSolverMultistepScheduler.from_config(
            train_config, algorithm_type="dpmsolver++", timestep_spacing="linspace", variance_type=None
        )
    if name == "ddpm":
        if learn_sigma is None:
            return DDPMScheduler.from_config(train_config)
        return DDPMScheduler.from_config(train_config, variance_type="learned_range" if learn_sigma else "fixed_small")
    raise InputError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def guidance_ramp(scale: float, t: torch.Tensor, num_train_timesteps: int = 1000, power: float = 0.01):
    """The public code's power-cosine guidance scale: (s - 1) (1 - cos(pi (1 - t / T)^power)) / 2 + 1."""
    frac = (1 - t.float() / num_train_timesteps).clamp(min=0) ** power
    return (scale - 1) * (1 - torch.cos(frac * math.pi)) / 2 + 1


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounded to uint8."""
    arrays = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [PIL.Image.fromarray(a) for a in arrays]


@dataclass
class XMDPTPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | torch.Tensor


class XMDPTPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "reference_encoder->pose_encoder->codec->denoiser"

    def __init__(self, denoiser: XMDPT, codec, pose_encoder, reference_encoder, scheduler):
        super().__init__()
        self.register_modules(
            denoiser=denoiser,
            codec=codec,
            pose_encoder=pose_encoder,
            reference_encoder=reference_encoder,
            scheduler=scheduler,
        )

    @property
    def image_size(self) -> tuple[int, int]:
        f = self.codec.downsample_factor
        h, w = self.denoiser.config.sample_size
        return h * f, w * f

    def seeded_latents(self, seeds: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Initial noise (B, C, h, w) on the CPU, item i drawn from its own generator seeded `seeds[i]`, so a batch
        gives each item the noise it gets alone. The generators come back advanced past it, for a stochastic sampler
        to continue each item's stream."""
        shape = (1, self.denoiser.config.in_channels, *self.denoiser.config.sample_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return torch.cat([torch.randn(shape, generator=g) for g in generators]), generators

    @torch.no_grad()
    def encode_conditions(self, reference_image: torch.Tensor, pose_image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything that depends only on the reference (B, 3, H, W) in [-1, 1] and the rendered target pose
        (B, 3, H, W) in [0, 1]: computed once per image."""
        reference_latent = self.codec.encode(reference_image)  # deterministic posterior mean
        conditions = dict(
            pose_features=self.pose_encoder(pose_image),  # (B, T_p, W_p)
            reference_features=self.reference_encoder((reference_image + 1) / 2),  # (B, T_r, W_r)
            reference_latent=reference_latent.to(self.denoiser.dtype),  # (B, C, h, w)
        )
        if self.denoiser.pose_embedder is not None:
            conditions["pose_map"] = self.denoiser.pose_map(pose_image).to(self.denoiser.dtype)  # (B, 3 f^2, h, w)
        if self.denoiser.config.reference_layers:
            conditions["reference_memory"] = self.denoiser.reference_memory(
                conditions["reference_latent"]
            )  # (B, N, D)
        return conditions

    def embed_condition(
        self, conditions: dict[str, torch.Tensor], reference_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The aggregation vector y (B, D) from `encode_conditions`' output."""
        keys = ("pose_features", "reference_features", "reference_latent")
        return self.denoiser.embed_condition(*(conditions[k] for k in keys), reference_tokens=reference_tokens)

    def set_sampler(self, name: str) -> None:
        """Swap the scheduler for one of `SAMPLERS` on the same training schedule ("ddpm" with this denoiser's
        learned or fixed variance)."""
        self.scheduler = make_sampling_scheduler(name, self.scheduler.config, self.denoiser.config.learn_sigma)

    def _check_inputs(self, reference_image: torch.Tensor, pose_image: torch.Tensor) -> None:
        size = self.image_size
        for name, x in (("reference_image", reference_image), ("pose_image", pose_image)):
            if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != size:
                raise InputError(f"{name} must be (B, 3, {size[0]}, {size[1]}) for this model, got {tuple(x.shape)}")
        if reference_image.shape[0] != pose_image.shape[0]:
            raise InputError(f"{reference_image.shape[0]} reference images but {pose_image.shape[0]} poses")

    def _sampler_input(self, output: torch.Tensor, channels: int) -> torch.Tensor:
        # DDPM's learned-range variance uses the v channels; the other samplers take the prediction alone.
        variance = self.scheduler.config.variance_type if isinstance(self.scheduler, DDPMScheduler) else None
        if variance == "learned":
            return output
        if variance == "learned_range":
            # Eq. 15 of Improved DDPM interpolates between the two log-variances with frac = (v + 1) / 2; a v outside
            # [-1, 1] extrapolates beyond both. Where the training schedule's two bounds nearly coincide (most t of
            # T = 1000) L_vb barely constrains v, so an under-trained model drifts there (|v| up to 5 in the embedded
            # one), and on a respaced schedule, whose bounds lie far apart, the extrapolated noise blows up sampling.
            # Clamping keeps Eq. 15 an interpolation; a well-trained model's v lies inside and is unchanged.
            return torch.cat([output[:, :channels], output[:, channels:].clamp(-1, 1)], dim=1)
        return output[:, :channels]

    def guided_prediction(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        condition: torch.Tensor,
        guidance_scale: float,
        power: float,
        pose_map: torch.Tensor | None = None,
        reference_memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One batched forward for the conditional and unconditional halves (the unconditional model drops y and
        the reference memory; the pose map, when there is one, stays)."""
        B = latents.shape[0]
        extra = dict(pose_map=pose_map, reference_memory=reference_memory)
        if guidance_scale == 1.0:
            return self.denoiser(latents, t.expand(B), condition=condition, **extra)
        extra = {k: None if v is None else torch.cat([v, v]) for k, v in extra.items()}
        drop = torch.arange(2 * B, device=latents.device) >= B  # the second half is unconditional
        out = self.denoiser(
            torch.cat([latents, latents]),
            t.expand(2 * B),
            condition=condition.repeat(2, 1),
            drop_condition=drop,
            **extra,
        )
        cond, uncond = out.chunk(2)
        T = self.scheduler.config.num_train_timesteps
        return uncond + guidance_ramp(guidance_scale, t, T, power).to(out.dtype) * (cond - uncond)

    def public_guided_prediction(
        self, latents: torch.Tensor, t: torch.Tensor, conditions: dict[str, torch.Tensor], guidance_scale: float, power
    ) -> torch.Tensor:
        """The public code's schedule of work: two unbatched passes, each recomputing the aggregation vector and
        pushing the reference tokens through every block. Same result, about twice the work."""
        B, model = latents.shape[0], self.denoiser

        def one_pass(drop: bool) -> torch.Tensor:
            x = model.embed_target(latents, conditions.get("pose_map"))
            ref = model.embed_latent(conditions["reference_latent"])
            y = self.embed_condition(conditions, reference_tokens=ref) * (0.0 if drop else 1.0)
            memory = model.reference_memory(conditions["reference_latent"])  # None without reference attention
            gate = None if memory is None else memory.new_full((B, 1, 1), 0.0 if drop else 1.0)
            c = model.t_embedder(t.expand(B)) + y
            for i, block in enumerate(model.blocks):
                if i == model.config.depth - model.config.decode_layers:
                    x = x + model.decoder_pos_embed
                x = block(x, c, None, memory, gate)
                ref = block(ref, c)  # unused at inference, as in the public code
            return model.unpatchify(model.final_layer(x, c))

        uncond = one_pass(drop=True)
        if guidance_scale == 1.0:
            return one_pass(drop=False)
        cond = one_pass(drop=False)
        T = self.scheduler.config.num_train_timesteps
        return uncond + guidance_ramp(guidance_scale, t, T, power).to(uncond.dtype) * (cond - uncond)

    @torch.no_grad()
    def denoise(
        self,
        conditions: dict[str, torch.Tensor],
        condition: torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 2.0,
        guidance_power: float = 0.01,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        public_schedule: bool = False,
        progress: bool = True,
        guidance_interval: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """The sampling loop from noise to clean latents, given the per-image `conditions` (encoder features and
        reference latent) and the aggregation vector `condition` (B, D) computed from them. With a
        `guidance_interval` (lo, hi), steps at timesteps outside [lo, hi] run unguided (one conditional pass)."""
        interval = check_guidance_interval(guidance_interval, self.scheduler.config.num_train_timesteps)
        B, C = condition.shape[0], self.denoiser.config.in_channels
        device = condition.device
        if latents is None:
            h, w = self.denoiser.config.sample_size
            latents = torch.randn((B, C, h, w), generator=generator, device=generator.device if generator else None)
        latents = latents.to(device=device, dtype=self.denoiser.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        # As diffusers' pipelines do: only the stochastic schedulers take a generator (UniPC's step() refuses one).
        step_kwargs = (
            {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        )
        # Which steps are guided, decided once from the schedule (no device sync per step).
        scales = [
            guidance_scale if interval is None or interval[0] <= t <= interval[1] else 1.0
            for t in self.scheduler.timesteps.tolist()
        ]
        timesteps = self.progress_bar(self.scheduler.timesteps) if progress else self.scheduler.timesteps
        for t, scale in zip(timesteps, scales, strict=True):
            model_input = self.scheduler.scale_model_input(latents, t)
            if public_schedule:
                out = self.public_guided_prediction(model_input, t, conditions, scale, guidance_power)
            else:
                out = self.guided_prediction(
                    model_input,
                    t,
                    condition,
                    scale,
                    guidance_power,
                    conditions.get("pose_map"),
                    conditions.get("reference_memory"),
                )
            latents = self.scheduler.step(self._sampler_input(out, C), t, latents, **step_kwargs).prev_sample
        return latents

    @torch.no_grad()
    def __call__(
        self,
        reference_image: ImageInput | Sequence[ImageInput],
        target_pose: PoseInput | Sequence[PoseInput],
        num_inference_steps: int = 50,
        guidance_scale: float = 2.0,
        guidance_power: float = 0.01,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        public_schedule: bool = False,
        progress: bool = True,
        fit: Fit = "pad",
        pose_extractor: PoseExtractor | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ) -> XMDPTPipelineOutput:
        """Generate the reference person in the target pose.

        reference_image: a PIL image, an image path, or a tensor (B, 3, H, W) in [-1, 1]; or a list of them.
        target_pose: a `Pose`, a keypoint file (our JSON or a PIDM `.txt`), a driving photo (PIL image or path,
        keypoints found by MediaPipe), or the rendered skeleton (B, 3, H, W) in [0, 1]; or a list of them.
        Images and poses are brought to `self.image_size` by `fit` ("pad", "crop" or "stretch"), the pose in the same
        frame; tensors must already be at that size. One reference with several poses is used for each pose.
        `pose_extractor` (a `PoseExtractor`, left open) saves opening MediaPipe per call for driving photos.
        `guidance_interval` (lo, hi): guide only at timesteps in [lo, hi] (None: at every step, as published).
        Returns PIL images, or with output_type="pt" a tensor (B, 3, H, W) in [-1, 1].
        """
        if output_type not in ("pil", "pt"):
            raise InputError(f"unknown output_type {output_type!r}; use 'pil' or 'pt'")
        T = self.scheduler.config.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise InputError(f"num_inference_steps={num_inference_steps} must lie in [1, {T}] (the training schedule)")
        if not math.isfinite(guidance_scale):
            raise InputError(f"guidance_scale={guidance_scale} must be a finite number")
        guidance_interval = check_guidance_interval(guidance_interval, T)
        for name, value in (("reference_image", reference_image), ("target_pose", target_pose)):
            if isinstance(value, list | tuple) and not value:
                raise InputError(f"{name} is an empty list: give at least one")
        with PoseReader(pose_extractor) as reader:
            reference_image, pose_image = prepare_inputs(reference_image, target_pose, self.image_size, fit, reader)
        device = self._execution_device
        reference_image = reference_image.to(device)
        pose_image = pose_image.to(device)
        self._check_inputs(reference_image, pose_image)
        conditions = self.encode_conditions(reference_image, pose_image)
        condition = self.embed_condition(conditions)  # (B, D), once per image

        latents = self.denoise(
            conditions,
            condition,
            num_inference_steps,
            guidance_scale,
            guidance_power,
            generator,
            latents,
            public_schedule,
            progress,
            guidance_interval,
        )
        images = self.codec.decode(latents)
        if output_type == "pt":
            return XMDPTPipelineOutput(images=images)
        return XMDPTPipelineOutput(images=to_pil(images))
