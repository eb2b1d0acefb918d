"""XMDPTPipeline: the sampling loop and its defaults (a diffusers `DiffusionPipeline`).

Components: the denoiser (`XMDPT`), a latent codec (`VAECodec` or `PixelCodec`), a pose encoder and a reference
encoder (`DinoV2Encoder` or `LearnedImageEncoder`), and any diffusers scheduler (DDIM as published, DPM-Solver++,
DDPM), swappable with `Scheduler.from_config(pipe.scheduler.config)` or `set_sampler`.

The pipeline owns its sampling defaults: steps, guidance scale, guidance interval and the guidance ramp's power are
its config (`register_to_config`, saved in `model_index.json`), and the saved scheduler is its sampler. So a bare
`pipe(reference, pose)` and every front end sample a model with the settings it was shipped with; a call's keyword
arguments override them for that call, and `sampling_settings` resolves and checks the result.

Two wastes of the public code are gone, with identical outputs (tests/test_pipeline.py compares against
`bench/public_schedule.py`):
- the conditional and unconditional passes of classifier-free guidance run as one batched forward;
- everything that depends only on the reference and the pose (encoder features, the reference latent, the
  aggregation vector y, the memory of reference attention) is computed once per image instead of once per step,
  and the reference tokens are not pushed through every block at every step (only the training-only masked pass
  uses them).
Beyond the paper, a guidance interval (lo, hi) applies guidance only at timesteps in [lo, hi] (Kynkaenniemi et al.
2024, "Applying Guidance in a Limited Interval"): elsewhere a step is one conditional pass, so it also saves work.
Turning photos, paths, keypoint files and driving photos into the model's tensors is `xmdpt.inputs`'s job.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import PIL.Image
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.utils import BaseOutput

# Imported here also because diffusers loads saved components only from modules already imported.
from xmdpt.conditioning import encode_reference
from xmdpt.errors import InputError
from xmdpt.inputs import Fit, ImageInput, PoseInput, PoseReader, prepare_inputs
from xmdpt.models.cache import FeatureCache, make_feature_cache
from xmdpt.models.xmdpt import XMDPT, Conditions
from xmdpt.pose.extract import PoseExtractor
from xmdpt.schedulers import PublicDDIMScheduler
from xmdpt.settings import SAMPLERS, SamplingSettings, native_bf16

# The pipeline's own sampling defaults: its config, saved in model_index.json.
SAMPLING_DEFAULTS = (
    "num_inference_steps", "guidance_scale", "guidance_interval", "guidance_power", "precision", "cache"
)  # fmt: skip


def make_sampling_scheduler(
    name: str, train_config, learn_sigma: bool | None = None
) -> DDIMScheduler | DPMSolverMultistepScheduler | DDPMScheduler:
    """A sampler on the training schedule. "ddim" (eta 0, no clipping, as published) and "dpmsolver++" use linspace
    spacing, whose timesteps (999, 979, ..., 0 for 50 steps) are those of the public code's respaced DDIM.
    `learn_sigma` (the denoiser's, as `XMDPTPipeline.set_sampler` passes it) decides DDPM's variance: learned-range
    or fixed; None keeps `train_config`'s, which a DDIM or DPM-Solver config no longer holds."""
    if name == "ddim":
        return DDIMScheduler.from_config(train_config, timestep_spacing="linspace", clip_sample=False)
    if name == "ddim-public":  # the public code's respaced DDIM step for step (see xmdpt.schedulers)
        return PublicDDIMScheduler.from_config(train_config, clip_sample=False)
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


def sampler_name(scheduler) -> str:
    """The `SAMPLERS` name of a scheduler, or its class name for any other diffusers scheduler."""
    names = {DDIMScheduler: "ddim", DPMSolverMultistepScheduler: "dpmsolver++", DDPMScheduler: "ddpm"}
    names[PublicDDIMScheduler] = "ddim-public"
    return names.get(type(scheduler), type(scheduler).__name__)


class ReferenceEncodings:
    """What a reference image alone decides, its reference-encoder features and its latent, for the last `capacity`
    images seen, keyed by the image's content: one reference asked in several poses (a list of poses, a batch CSV
    that repeats it, a web page's repeated requests with the same photo) runs DINOv2 and the VAE encoder once. The
    key also holds the autocast precision and the weights' in-place version counters, so a changed precision or
    encoder (say, weights loaded into it) encodes anew. Thread-safe; `capacity=0` turns it off."""

    def __init__(self, capacity: int = 16):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.hits = self.misses = 0
        self._entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    @staticmethod
    def _context(images: torch.Tensor, modules: Sequence[torch.nn.Module]) -> bytes:
        device = images.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        versions = [(id(m), sum(p._version for p in m.parameters())) for m in modules if m is not None]
        return repr((str(images.device), str(autocast), str(images.dtype), tuple(images.shape[1:]), versions)).encode()

    def __call__(
        self,
        images: torch.Tensor,
        encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        modules: Sequence[torch.nn.Module] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode(images)` (features (B, ...), latents (B, ...)), each distinct image of the batch encoded at most
        once and not at all when it is held; `modules` are those whose weights `encode` uses."""
        if self.capacity == 0:
            return encode(images)
        context = self._context(images, modules)
        keys = [hashlib.sha256(context + image.contiguous().cpu().numpy().tobytes()).hexdigest() for image in images]
        with self._lock:
            held = {k: self._entries[k] for k in keys if k in self._entries}
            for k in held:
                self._entries.move_to_end(k)
            todo = list(dict.fromkeys(k for k in keys if k not in held))  # distinct, in order
            self.hits, self.misses = self.hits + len(keys) - len(todo), self.misses + len(todo)
        if todo:
            first = {k: keys.index(k) for k in todo}
            features, latents = encode(images[[first[k] for k in todo]])
            held |= {k: (features[i], latents[i]) for i, k in enumerate(todo)}
            with self._lock:
                for k in todo if self.capacity else []:
                    self._entries[k] = held[k]
                    self._entries.move_to_end(k)
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        return torch.stack([held[k][0] for k in keys]), torch.stack([held[k][1] for k in keys])


class XMDPTPipeline(DiffusionPipeline):
    """Re-pose a reference person: `pipe(reference, pose).images`. The keyword arguments after the components are the
    sampling defaults, saved with the pipeline (see the module docstring)."""

    model_cpu_offload_seq = "reference_encoder->pose_encoder->codec->denoiser"
    reference_cache_size = 16  # references whose encodings are kept (see `ReferenceEncodings`); 0: none

    def __init__(
        self,
        denoiser: XMDPT,
        codec,
        pose_encoder,
        reference_encoder,
        scheduler,
        num_inference_steps: int = 50,
        guidance_scale: float = 2.0,
        guidance_interval: list[float] | None = None,
        guidance_power: float = 0.01,
        precision: str = "auto",
        cache: str = "none",
    ):
        super().__init__()
        self.register_modules(
            denoiser=denoiser,
            codec=codec,
            pose_encoder=pose_encoder,
            reference_encoder=reference_encoder,
            scheduler=scheduler,
        )
        self.reference_encodings = ReferenceEncodings(self.reference_cache_size)
        self.set_sampling_defaults(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            guidance_power=guidance_power,
            precision=precision,
            cache=cache,
        )

    @property
    def image_size(self) -> tuple[int, int]:
        f = self.codec.downsample_factor
        h, w = self.denoiser.config.sample_size
        return h * f, w * f

    # ---- sampling settings -----------------------------------------------------------------------------------
    def sampling_settings(self, **overrides) -> SamplingSettings:
        """The pipeline's defaults with a call's overrides (None keeps the default), checked."""
        unknown = set(overrides) - set(SAMPLING_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown sampling settings: {', '.join(sorted(unknown))}")
        defaults = {k: self.config[k] for k in SAMPLING_DEFAULTS if k in self.config}  # older folders: no precision
        chosen = defaults | {k: v for k, v in overrides.items() if v is not None}
        if chosen.get("precision") == "auto":
            chosen["precision"] = "bf16" if native_bf16(self._execution_device) else "fp32"
        return SamplingSettings(sampler=sampler_name(self.scheduler), **chosen)

    def set_sampling_defaults(self, **settings) -> None:
        """Change the defaults that `save_pretrained` stores (any of `SAMPLING_DEFAULTS`; a guidance interval of
        None guides every step), checked as `sampling_settings` checks them."""
        unknown = set(settings) - set(SAMPLING_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown sampling settings: {', '.join(sorted(unknown))}")
        merged = {k: self.config[k] for k in SAMPLING_DEFAULTS if k in self.config} | settings
        values = SamplingSettings(sampler="", **merged).as_dict()
        del values["sampler"]
        self.register_to_config(**values)

    def set_sampler(self, name: str) -> None:
        """Swap the scheduler for one of `SAMPLERS` on the same training schedule ("ddpm" with this denoiser's
        learned or fixed variance)."""
        self.scheduler = make_sampling_scheduler(name, self.scheduler.config, self.denoiser.config.learn_sigma)

    # ---- conditions: once per image --------------------------------------------------------------------------
    def seeded_latents(self, seeds: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Initial noise (B, C, h, w) on the CPU, item i drawn from its own generator seeded `seeds[i]`, so a batch
        gives each item the noise it gets alone. The generators come back advanced past it, for a stochastic sampler
        to continue each item's stream."""
        shape = (1, self.denoiser.config.in_channels, *self.denoiser.config.sample_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return torch.cat([torch.randn(shape, generator=g) for g in generators]), generators

    @torch.no_grad()
    def encode_inputs(self, reference_image: torch.Tensor, pose_image: torch.Tensor) -> tuple:
        """The frozen encoders' side: (pose features, reference features, reference latent (the posterior mean),
        pose image or None) from the reference (B, 3, H, W) in [-1, 1] and the rendered pose (B, 3, H, W) in [0, 1]:
        the arguments of `XMDPT.encode_conditions`."""
        modules = (self.reference_encoder, self.codec)
        reference_features, reference_latent = self.reference_encodings(
            reference_image, self._encode_references, modules
        )
        pose = pose_image.to(self.denoiser.dtype) if self.denoiser.pose_embedder is not None else None
        return self.pose_encoder(pose_image), reference_features, reference_latent.to(self.denoiser.dtype), pose

    def _encode_references(self, reference_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_reference(self.reference_encoder, reference_image), self.codec.encode(reference_image)

    @torch.no_grad()
    def encode_conditions(self, reference_image: torch.Tensor, pose_image: torch.Tensor) -> Conditions:
        """Everything that depends only on the reference and the target pose: computed once per image."""
        return self.denoiser.encode_conditions(*self.encode_inputs(reference_image, pose_image))

    def _check_inputs(self, reference_image: torch.Tensor, pose_image: torch.Tensor) -> None:
        size = self.image_size
        for name, x in (("reference_image", reference_image), ("pose_image", pose_image)):
            if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != size:
                raise InputError(f"{name} must be (B, 3, {size[0]}, {size[1]}) for this model, got {tuple(x.shape)}")
        if reference_image.shape[0] != pose_image.shape[0]:
            raise InputError(f"{reference_image.shape[0]} reference images but {pose_image.shape[0]} poses")

    # ---- the sampling loop -----------------------------------------------------------------------------------
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
        conditions: Conditions,
        guidance_scale: float,
        power: float,
        cache: FeatureCache | None = None,
    ) -> torch.Tensor:
        """One batched forward for the conditional and unconditional halves (the unconditional model drops y and
        the reference memory; the pose map, when there is one, stays)."""
        B = latents.shape[0]
        if guidance_scale == 1.0:
            return self.denoiser(latents, t, conditions, cache=cache)
        drop = torch.arange(2 * B, device=latents.device) >= B  # the second half is unconditional
        out = self.denoiser(torch.cat([latents, latents]), t, conditions.repeat(2), drop_condition=drop, cache=cache)
        cond, uncond = out.chunk(2)
        T = self.scheduler.config.num_train_timesteps
        return uncond + guidance_ramp(guidance_scale, t, T, power).to(out.dtype) * (cond - uncond)

    @torch.no_grad()
    def denoise(
        self,
        conditions: Conditions,
        settings: SamplingSettings,
        latents: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """The sampling loop from the initial noise `latents` (B, C, h, w) to clean latents; steps at timesteps
        outside the guidance interval run unguided (one conditional pass)."""
        C = self.denoiser.config.in_channels
        device = conditions.y.device
        latents = latents.to(device=device, dtype=self.denoiser.dtype)
        # A scheduler of this call's own: set_timesteps and the multistep solvers keep state, so threads sharing one
        # pipeline (a server) would otherwise step each other's schedules.
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(settings.num_inference_steps, device=device)
        latents = latents * scheduler.init_noise_sigma
        # As diffusers' pipelines do: only the stochastic schedulers take a generator (UniPC's step() refuses one).
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        # Which steps are guided, decided once from the schedule (no device sync per step).
        interval = settings.guidance_interval
        scales = [
            settings.guidance_scale if interval is None or interval[0] <= t <= interval[1] else 1.0
            for t in scheduler.timesteps.tolist()
        ]
        cache = make_feature_cache(settings.cache)  # this call's own, like the scheduler
        timesteps = self.progress_bar(scheduler.timesteps) if progress else scheduler.timesteps
        for index, (t, scale) in enumerate(zip(timesteps, scales, strict=True)):
            cache.begin_step(index, len(scales))
            model_input = scheduler.scale_model_input(latents, t)
            out = self.guided_prediction(model_input, t, conditions, scale, settings.guidance_power, cache)
            out = self._sampler_input(out.float(), C)  # the solver's arithmetic in fp32 whatever the precision
            latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample
        return latents

    @torch.no_grad()
    def __call__(
        self,
        reference_image: ImageInput | Sequence[ImageInput],
        target_pose: PoseInput | Sequence[PoseInput],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        guidance_power: float | None = None,
        precision: str | None = None,
        cache: str | None = None,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        progress: bool = True,
        fit: Fit = "pad",
        pose_extractor: PoseExtractor | None = None,
    ) -> XMDPTPipelineOutput:
        """Generate the reference person in the target pose.

        reference_image: a PIL image, an image path, or a tensor (B, 3, H, W) in [-1, 1]; or a list of them.
        target_pose: a `Pose`, a keypoint file (our JSON or a PIDM `.txt`), a driving photo (PIL image or path,
        keypoints found by MediaPipe), or the rendered skeleton (B, 3, H, W) in [0, 1]; or a list of them.
        Images and poses are brought to `self.image_size` by `fit` ("pad", "crop" or "stretch"), the pose in the same
        frame; tensors must already be at that size. One reference with several poses is used for each pose.
        The sampling settings default to the pipeline's own (`self.config`); (0, 1000) as the guidance interval
        guides every step; `cache` ("none", "fora:N", "teacache:D") reuses the blocks' work across steps (see
        `xmdpt.models.cache`). `seed`: an int seeds the whole batch's noise, a list one seed per image (each image then
        is what it would be alone); or pass a `generator` and/or the initial `latents`. `pose_extractor` (a
        `PoseExtractor`, left open) saves opening MediaPipe per call for driving photos.
        Returns PIL images, or with output_type="pt" a tensor (B, 3, H, W) in [-1, 1].
        """
        if output_type not in ("pil", "pt"):
            raise InputError(f"unknown output_type {output_type!r}; use 'pil' or 'pt'")
        settings = self.sampling_settings(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            guidance_power=guidance_power,
            precision=precision,
            cache=cache,
        )
        for name, value in (("reference_image", reference_image), ("target_pose", target_pose)):
            if isinstance(value, list | tuple) and not value:
                raise InputError(f"{name} is an empty list: give at least one")
        with PoseReader(pose_extractor) as reader:
            reference_image, pose_image = prepare_inputs(reference_image, target_pose, self.image_size, fit, reader)
        latents, generator = self._initial_noise(reference_image.shape[0], seed, generator, latents)
        images = self.generate(reference_image, pose_image, settings, latents, generator, progress)
        return XMDPTPipelineOutput(images=images if output_type == "pt" else to_pil(images))

    @torch.no_grad()
    def generate(
        self,
        reference_image: torch.Tensor,
        pose_image: torch.Tensor,
        settings: SamplingSettings,
        latents: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Tensors in, tensors out, with resolved settings: the reference (B, 3, H, W) in [-1, 1], the rendered pose
        (B, 3, H, W) in [0, 1] and the initial noise (B, C, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        if settings.sampler != sampler_name(self.scheduler):
            have = sampler_name(self.scheduler)
            raise ValueError(f"the settings are for the {settings.sampler} sampler, this pipeline has {have}")
        device = self._execution_device
        reference_image, pose_image = reference_image.to(device), pose_image.to(device)
        self._check_inputs(reference_image, pose_image)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            conditions = self.encode_conditions(reference_image, pose_image)
            images = self.codec.decode(self.denoise(conditions, settings, latents, generator, progress))
        return images.float()

    def _initial_noise(self, batch: int, seed, generator, latents) -> tuple[torch.Tensor, object]:
        if seed is not None:
            if generator is not None:
                raise InputError("give a seed or a generator, not both")
            if isinstance(seed, int):
                generator = torch.Generator().manual_seed(seed)
            else:
                if len(seed) != batch:
                    raise InputError(f"{len(seed)} seeds for {batch} images")
                noise, generator = self.seeded_latents(seed)
                latents = noise if latents is None else latents
        if latents is None:
            shape = (batch, self.denoiser.config.in_channels, *self.denoiser.config.sample_size)
            g = generator[0] if isinstance(generator, list) else generator
            latents = torch.randn(shape, generator=generator, device=g.device if g is not None else None)
        elif latents.shape[0] != batch:
            raise InputError(f"latents hold {latents.shape[0]} images, the inputs {batch}")
        return latents, generator
