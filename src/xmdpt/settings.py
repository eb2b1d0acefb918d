"""Sampling settings, checked where no sampler is loaded (the CLI, the web page, evaluation): kept apart from the
pipeline, which imports diffusers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from xmdpt.errors import InputError

NUM_TRAIN_TIMESTEPS = 1000
# The components the published models were trained with (reference Sec. 3 and 7), and the public code's sampling:
# its respaced DDIM (`ddim-public`), 50 steps, guidance 2.0 on the power-cosine ramp, at every step.
PUBLISHED_VAE = "stabilityai/sd-vae-ft-mse"
PUBLISHED_POSE_ENCODER = "facebook/dinov2-base"
PUBLISHED_REFERENCE_ENCODER = "facebook/dinov2-giant"
PUBLISHED_SAMPLING = dict(num_inference_steps=50, guidance_scale=2.0, guidance_interval=None, guidance_power=0.01)
# The fast setting for a converted public model (`xmdpt convert --sampling fast`): DPM-Solver++ at 20 steps, guidance
# only on t in [200, 800] and FORA; each lever kept the embedded default's held-out scores (docs/benchmarks.md), but
# none could be checked on the published weights here.
FAST_SAMPLING = PUBLISHED_SAMPLING | dict(num_inference_steps=20, guidance_interval=[200.0, 800.0], cache="fora:3")
SAMPLING_PRESETS = {"published": ("ddim-public", PUBLISHED_SAMPLING), "fast": ("dpmsolver++", FAST_SAMPLING)}
# Precision of sampling: fp32, bf16 or fp16 autocast, or "auto": bf16 where the hardware has native bf16 matrix
# units (AMX or AVX512-BF16 CPUs, CUDA compute capability 8.0 and above), fp32 elsewhere.
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
# Training-free feature caching across sampling steps (see xmdpt.models.cache): "none"; "fora:N", FORA's static
# reuse of every block's attention and MLP outputs for N - 1 steps after each full step (Selvaraju et al. 2024);
# "teacache:D", TeaCache's adaptive skip of the whole block stack while the accumulated relative change of the
# timestep-modulated input stays under D (Liu et al. 2024).
CACHE_METHODS = ("none", "fora", "teacache")
# The samplers `XMDPTPipeline.set_sampler` knows by name (any other diffusers scheduler swaps in by `from_config`).
SAMPLERS = ("ddim", "ddim-public", "dpmsolver++", "ddpm")


def check_guidance_interval(
    interval: Sequence[float] | None, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> tuple[float, float] | None:
    """`(lo, hi)` as floats with 0 <= lo <= hi <= T, or None (guidance at every step, as published)."""
    if interval is None:
        return None
    if isinstance(interval, str | bytes):
        raise InputError(f"guidance_interval={interval!r} must be two timesteps (lo, hi), not a string")
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise InputError(f"guidance_interval={interval!r} must be two timesteps (lo, hi)") from None
    if not 0 <= lo <= hi <= num_train_timesteps:
        raise InputError(f"guidance_interval=({lo:g}, {hi:g}) must satisfy 0 <= lo <= hi <= {num_train_timesteps}")
    return lo, hi


def native_bf16(device) -> bool:
    """Whether `device` has native bf16 matrix units: a CUDA GPU of compute capability 8.0 or above, or a CPU with
    AMX or AVX512-BF16 (read from /proc/cpuinfo; elsewhere, no)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def parse_cache(text: str) -> tuple[str, float]:
    """A feature-cache setting "none", "fora:N" (N a whole number >= 1) or "teacache:D" (0 <= D <= 10) -> (method,
    parameter), checked; "fora:1" and "teacache:0" cache nothing and give the uncached result."""
    if not isinstance(text, str):
        raise InputError(f"cache={text!r} must be a string: none, fora:N or teacache:D")
    method, _, value = text.strip().lower().partition(":")
    if method == "none" and not value:
        return "none", 0.0
    if method not in CACHE_METHODS[1:] or not value:
        raise InputError(f"cache={text!r}: give none, fora:N (e.g. fora:2) or teacache:D (e.g. teacache:0.1)")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if method == "fora" and not (number.is_integer() and 1 <= number <= NUM_TRAIN_TIMESTEPS):
        raise InputError(f"cache={text!r}: FORA's interval N must be a whole number of steps in [1, 1000]")
    if method == "teacache" and not 0 <= number <= 10:
        raise InputError(f"cache={text!r}: TeaCache's threshold D must be a number in [0, 10]")
    return method, number


def parse_guidance_interval(text: str) -> tuple[float, float]:
    """The command line's spelling: "LO,HI" -> (lo, hi); "all" -> (0, T), which guides every step."""
    if text.strip().lower() == "all":
        return 0.0, float(NUM_TRAIN_TIMESTEPS)
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2:
        raise InputError(f"--guidance-interval {text!r}: give two timesteps LO,HI (e.g. 200,800) or 'all'")
    try:
        return check_guidance_interval(values)
    except InputError as err:
        raise InputError(f"--guidance-interval {text!r}: {err}") from None


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that decides how a pipeline samples, resolved from its config and a call's overrides; what
    `generation.json` records."""

    sampler: str  # the scheduler: "ddim", "dpmsolver++", "ddpm", or another diffusers class name
    num_inference_steps: int
    guidance_scale: float
    guidance_interval: tuple[float, float] | None  # guide only at timesteps in [lo, hi]; None: at every step
    guidance_power: float  # the public code's power-cosine ramp of the guidance scale
    precision: str = "fp32"  # one of PRECISIONS; `XMDPTPipeline.sampling_settings` resolves "auto"
    cache: str = "none"  # feature caching across steps: "none", "fora:N" or "teacache:D" (see `parse_cache`)

    def __post_init__(self) -> None:
        if isinstance(self.num_inference_steps, bool) or not 1 <= self.num_inference_steps <= NUM_TRAIN_TIMESTEPS:
            raise InputError(f"num_inference_steps={self.num_inference_steps} must lie in [1, {NUM_TRAIN_TIMESTEPS}]")
        for name in ("guidance_scale", "guidance_power"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(f"{name}={getattr(self, name)} must be a finite number")
        object.__setattr__(self, "guidance_interval", check_guidance_interval(self.guidance_interval))
        if self.precision not in PRECISIONS:
            raise InputError(f"precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        method, value = parse_cache(self.cache)  # normalised spelling: "fora:2", "teacache:0.1"
        object.__setattr__(self, "cache", method if method == "none" else f"{method}:{value:g}")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["guidance_interval"] = None if self.guidance_interval is None else list(self.guidance_interval)
        return out
