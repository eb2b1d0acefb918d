"""`PublicDDIMScheduler`: DDIM stepped exactly as the public X-MDPT sampler steps, for output parity with it.

The public code (MDT's ADM-derived `gaussian_diffusion.py` and `respace.py`, used by X-MDPT's `infer_xmdpt.py`) samples
with `create_diffusion(str(num_sampling_steps))` and `ddim_sample_loop(..., clip_denoised=False)`, eta 0:
- `space_timesteps(1000, "50")` keeps one section of n timesteps, round(i * (T - 1) / (n - 1)) with the fractional
  stride accumulated (0, 20, 41, ..., 979, 999 for 50); `"ddim50"` would keep range(0, T, stride) instead;
- `SpacedDiffusion` gives the kept timesteps the betas 1 - alpha_bar(t) / alpha_bar(previous kept t), so the respaced
  process has the training alpha_bar at every visited t, and calls the model with the original timestep values;
- each DDIM step predicts x0 = sqrt(1 / a) x - sqrt(1 / a - 1) eps with a = alpha_bar(t), re-derives eps from x0, and
  moves to x0 sqrt(a') + sqrt(1 - a') eps with a' = alpha_bar of the NEXT VISITED timestep (1.0 after the last);
  the coefficients are computed in float64 and applied in float32; learned-sigma channels are split off and unused.
diffusers' `DDIMScheduler` visits the same timesteps with linspace spacing but steps from t to t - T // n (979 -> 959
rather than 958), so the same model gives different final latents. This scheduler removes that difference.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, SchedulerMixin  # noqa: F401 (diffusers' pipeline loader looks it up here)
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput, rescale_zero_terminal_snr
from diffusers.utils.torch_utils import randn_tensor

RESPACINGS = ("sections", "ddim")


def respaced_timesteps(num_train_timesteps: int, num_steps: int, respacing: str = "sections") -> list[int]:
    """The training timesteps the public sampler keeps for `num_steps` steps, ascending. "sections": ADM's
    `space_timesteps(T, str(n))`, one section (what X-MDPT's `create_diffusion(str(n))` uses); "ddim":
    `space_timesteps(T, f"ddim{n}")`, range(0, T, s) for the smallest integer stride s that gives exactly n."""
    T, n = num_train_timesteps, num_steps
    if isinstance(n, bool) or int(n) != n or not 1 <= n <= T:
        raise ValueError(f"the number of steps must be a whole number in [1, {T}], got {n!r}")
    n = int(n)
    if respacing == "ddim":
        for stride in range(1, T):
            if len(range(0, T, stride)) == n:
                return list(range(0, T, stride))
        raise ValueError(f"cannot visit exactly {n} of {T} timesteps with an integer stride")
    if respacing != "sections":
        raise ValueError(f"unknown respacing {respacing!r}; choose one of {RESPACINGS}")
    stride = 1.0 if n == 1 else (T - 1) / (n - 1)
    kept, position = [], 0.0
    for _ in range(n):  # accumulated, as the public code does (i * stride can round differently at .5)
        kept.append(round(position))
        position += stride
    return sorted(set(kept))


def _float64_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: np.ndarray | list[float] | None,
    rescale_betas_zero_snr: bool,
) -> np.ndarray:
    """The training betas in float64, as the public code computes them (diffusers' own are float32)."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        T = num_train_timesteps
        betas = np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)])
    else:
        raise NotImplementedError(f"{beta_schedule} is not implemented for PublicDDIMScheduler")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(torch.from_numpy(betas)).numpy()
    return betas


class PublicDDIMScheduler(DDIMScheduler):
    """DDIM as the public X-MDPT code samples (see the module docstring): `set_timesteps(n)` visits the public
    respaced timesteps in descending order and `step()` moves from the visited t to the next visited one.

    Args: the training schedule as `DDIMScheduler` takes it (num_train_timesteps, beta_start, beta_end, beta_schedule,
    trained_betas, rescale_betas_zero_snr), `prediction_type` ("epsilon", "v_prediction" or "sample"), `clip_sample`
    and `clip_sample_range` (the public `clip_denoised`, off as published), and `respacing`: "sections" (the public
    `create_diffusion(str(n))`, the default) or "ddim" (`space_timesteps(T, f"ddim{n}")`). DDIMScheduler's
    `timestep_spacing`, `steps_offset`, `set_alpha_to_one` and thresholding do not apply: the respacing fixes the
    visited timesteps, and the last step always goes to alpha_bar = 1. `step()` takes DDIM's arguments; eta is 0 in
    the public code, and eps is always re-derived from the (clipped) x0, as there."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        rescale_betas_zero_snr: bool = False,
        respacing: Literal["sections", "ddim"] = "sections",
    ):
        if respacing not in RESPACINGS:
            raise ValueError(f"unknown respacing {respacing!r}; choose one of {RESPACINGS}")
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        # DDIMScheduler's undecorated init sets its attributes (float32 betas, alphas_cumprod for add_noise, ...)
        # without registering its own config keys, which would not apply here.
        DDIMScheduler.__init__.__wrapped__(
            self,
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            clip_sample=clip_sample,
            set_alpha_to_one=True,
            steps_offset=0,
            prediction_type=prediction_type,
            clip_sample_range=clip_sample_range,
            timestep_spacing="linspace",
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        betas = _float64_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self.alphas_cumprod_float64 = np.cumprod(1.0 - betas)
        # visited t -> (alpha_bar(t), alpha_bar(next visited t)) of the respaced process, set by set_timesteps.
        self._step_alphas: dict[int, tuple[float, float]] = {}

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Visit the public respaced timesteps for `num_inference_steps` steps, largest first."""
        kept = respaced_timesteps(self.config.num_train_timesteps, num_inference_steps, self.config.respacing)
        # The respaced process: betas 1 - alpha_bar(t) / alpha_bar(previous kept t), and alpha_bar their cumprod.
        alphas, last = [], 1.0
        for t in kept:
            alpha_bar_t = float(self.alphas_cumprod_float64[t])
            beta = 1.0 - alpha_bar_t / last
            alphas.append(1.0 - beta)  # not simplified: the public float64 arithmetic, rounding included
            last = alpha_bar_t
        alphas_cumprod = np.cumprod(alphas).tolist()
        previous = [1.0] + alphas_cumprod[:-1]
        self._step_alphas = {t: (a, a_prev) for t, a, a_prev in zip(kept, alphas_cumprod, previous, strict=True)}
        self.num_inference_steps = len(kept)
        self.timesteps = torch.tensor(kept[::-1], dtype=torch.int64, device=device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One public DDIM step from the visited `timestep` to the next visited one. A `model_output` with twice the
        sample's channels carries learned-sigma channels, which DDIM ignores. Computed in float32 (float64 for a
        float64 sample) with float32-rounded float64 coefficients, as the public code does; returned in the sample's
        dtype. `use_clipped_model_output` has no effect: eps is always re-derived from x0."""
        if self.num_inference_steps is None:
            raise ValueError("the number of inference steps is unset: call set_timesteps first")
        t = int(timestep)
        if t not in self._step_alphas:
            raise ValueError(f"timestep {t} is not one of the {self.num_inference_steps} visited by set_timesteps")
        alpha_bar, alpha_bar_prev = self._step_alphas[t]
        channels = sample.shape[1]
        if model_output.shape[1] == 2 * channels:
            model_output = model_output[:, :channels]
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        x, out = sample.to(dtype), model_output.to(dtype)

        def coef(value: float) -> torch.Tensor:  # as the public `_extract_into_tensor`: float64 value, then cast
            return torch.tensor(value, dtype=dtype, device=sample.device)

        recip, recipm1 = coef(math.sqrt(1.0 / alpha_bar)), coef(math.sqrt(1.0 / alpha_bar - 1.0))
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            pred_original = recip * x - recipm1 * out
        elif prediction_type == "sample":
            pred_original = out
        elif prediction_type == "v_prediction":
            pred_original = coef(math.sqrt(alpha_bar)) * x - coef(math.sqrt(1.0 - alpha_bar)) * out
        else:
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        if self.config.clip_sample:
            pred_original = pred_original.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if prediction_type == "v_prediction" and not self.config.clip_sample:
            # eps directly from v: equal to the re-derived one, and defined at zero terminal SNR as well.
            pred_epsilon = coef(math.sqrt(alpha_bar)) * out + coef(math.sqrt(1.0 - alpha_bar)) * x
        else:
            pred_epsilon = (recip * x - pred_original) / recipm1

        # The rest in the tensor arithmetic of the public code, on the sample's device (torch's float32 sqrt on a CPU
        # can differ from a correctly rounded one by an ulp, and the public code uses torch's).
        a, a_prev = coef(alpha_bar), coef(alpha_bar_prev)
        if eta > 0:
            sigma = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
        else:
            sigma = torch.zeros_like(a)
        prev_sample = pred_original * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev - sigma**2) * pred_epsilon
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=dtype)
            prev_sample = prev_sample + sigma * variance_noise.to(dtype)
        prev_sample, pred_original = prev_sample.to(sample.dtype), pred_original.to(sample.dtype)
        if not return_dict:
            return prev_sample, pred_original
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original)
