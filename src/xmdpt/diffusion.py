"""The X-MDPT training objective over a diffusers `DDPMScheduler`.

loss = loss(full pass) + loss(masked pass) (paper Eq. 7, equal weights), each over the whole latent, where
loss(pass) = MSE(prediction, target) + L_vb, the learned-range variational term of Improved DDPM (Nichol & Dhariwal
2021, Eq. 16) computed on a detached mean so that it trains only the variance. Beyond the paper, small image terms
(`TextureTerm`, `PaletteTerm`) can be composed in, EDM-style. Training speed-ups, each off by default: token routing
(TREAD, Krause et al. 2025: a random subset of tokens skips a span of blocks), and representation alignment of a
block's tokens, to a frozen encoder's features of the clean target (`RepaTerm`, REPA, Yu et al. 2024) or to the EMA
model's deeper tokens at lower noise (`SelfAlignmentTerm`, SRA, Jiang et al. 2025). The scheduler owns the noise math
(betas, add_noise, velocity); this module owns the masking and the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDPMScheduler

from xmdpt.conditioning.encoders import neighbour_differences
from xmdpt.models.xmdpt import XMDPT, Conditions, TokenRoute, gather_tokens, random_masking, route_span

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def make_train_scheduler(prediction_type: str = "epsilon", learn_sigma: bool = True) -> DDPMScheduler:
    """The published schedule: linear betas 1e-4 .. 0.02 over T = 1000 steps, learned-range variance."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        variance_type="learned_range" if learn_sigma else "fixed_small",
        prediction_type=prediction_type,
        clip_sample=False,
    )


#################################################################################
#                     Gaussian helpers (Improved DDPM, App. A)                  #
#################################################################################


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log p(x) for data in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)) (DDPM's decoder L_0)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def check_lags(lags: tuple[int, ...]) -> None:
    if not lags or any(isinstance(lag, bool) or int(lag) != lag or lag < 1 for lag in lags):
        raise ValueError(f"lags must be whole numbers of pixels >= 1, got {lags}")


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """The mean over a `window` x `window` box around each pixel (odd `window`; fewer pixels at the border)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd number of pixels, got {window}")
    return F.avg_pool2d(x, window, stride=1, padding=window // 2, count_include_pad=False)


def local_contrast(images: torch.Tensor, window: int = 3, lags: tuple[int, ...] = (1,)) -> torch.Tensor:
    """(B, 2 x len(lags), H, W): for each lag, the mean absolute colour difference to the pixel `lag` to the right
    and `lag` below, box-averaged over `window` pixels: how much horizontal and vertical detail an image has where,
    whatever its phase. Stripes shifted by half a period have the same map; a flat tint has none. Several lags sample
    the local autocorrelation, so they also tell the detail's scale: one-pixel grain differs as much at lag 1 as at
    lag 2, cells of two pixels or more differ more at lag 2."""
    check_lags(lags)
    if max(lags) >= min(images.shape[-2:]):
        raise ValueError(f"lags {lags} must be smaller than the image ({tuple(images.shape[-2:])})")
    maps = [d.mean(dim=1, keepdim=True) for lag in lags for d in neighbour_differences(images, int(lag))]
    return box_mean(torch.cat(maps, dim=1), window)


# The six distinct entries of a 3x3 colour covariance: RR, GG, BB, RG, RB, GB.
_COLOUR_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def local_covariance(images: torch.Tensor, window: int = 5) -> torch.Tensor:
    """(B, 6, H, W): the covariance of the RGB colours over a `window` x `window` box around each pixel, a
    pixel-level Gram statistic (Gatys et al. 2016) that, like `local_contrast`, does not see phase. A two-colour
    stripe or check of colours a and b gives p(1 - p)(a - b)(a - b)^T, so with the local mean (which the MSE fixes)
    it pins both colours of the pattern; a flat tint gives zero, and detail in other colours another matrix."""
    if images.shape[1] != 3:
        raise ValueError(f"local_covariance needs RGB images (B, 3, H, W), got {tuple(images.shape)}")
    mean = box_mean(images, window)  # (B, 3, H, W)
    products = torch.stack([images[:, i] * images[:, j] for i, j in _COLOUR_PAIRS], dim=1)  # (B, 6, H, W)
    means = torch.stack([mean[:, i] * mean[:, j] for i, j in _COLOUR_PAIRS], dim=1)  # (B, 6, H, W)
    return box_mean(products, window) - means


#################################################################################
#                                 The objective                                 #
#################################################################################


@dataclass
class LossDraws:
    """The random draws of one training step, per sample: drawn for a global batch and sliced per process, so that
    a multi-process run sees exactly the randomness of a single-process run on the same global batch."""

    timesteps: torch.Tensor  # (B,) int64, shared by both passes
    noise: torch.Tensor  # (B, C, H, W) of the full pass
    drop_full: torch.Tensor  # (B,) bool: condition dropped in the full pass
    drop_masked: torch.Tensor  # (B,) bool: ... in the masked pass
    ids_keep: torch.Tensor | None  # (B, K) kept tokens of the masked pass
    noise_masked: torch.Tensor | None = None  # (B, C, H, W) of the masked pass: its own draw, as published
    # Token routing: positions in each pass's token sequence (of N, or of the K kept tokens) that run through the
    # routed span; the others skip it. None when routing is off.
    route_full: torch.Tensor | None = None  # (B, R) of N
    route_masked: torch.Tensor | None = None  # (B, R') of K
    teacher_timesteps: torch.Tensor | None = None  # (B,) int64, self-alignment's lower noise level for the EMA

    def __getitem__(self, index: slice) -> LossDraws:
        return LossDraws(*(None if v is None else v[index] for v in vars(self).values()))

    def to(self, device) -> LossDraws:
        return LossDraws(*(None if v is None else v.to(device) for v in vars(self).values()))


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate: full + masked
    full: torch.Tensor  # per-sample loss of the full pass (B,)
    masked: torch.Tensor | None  # per-sample loss of the masked pass (B,), None without it
    timesteps: torch.Tensor  # (B,)
    alignment: dict[str, torch.Tensor] = field(default_factory=dict)  # per-sample weighted alignment terms (B,)


class ImageTerm:
    """A loss term on decoded images, beyond the paper: weight x the squared error between a phase-blind statistic
    of the decoded x0 estimate and the same statistic of the decoded target. MSE alone makes the x0 estimate a
    posterior mean, so detail whose phase the noisy input does not yet fix (a fine stripe or check) averages to a flat
    tint; a statistic that does not see phase asks for detail of the right kind in the right place at any phase, as
    perceptual losses do."""

    def __init__(self, weight: float):
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"{type(self).__name__} weight must be a finite number > 0, got {weight}")
        self.weight = weight

    def statistic(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss from the two statistics (`statistic` of the estimate's and the target's images)."""
        return self.weight * mean_flat((estimate - target) ** 2)


class TextureTerm(ImageTerm):
    """`local_contrast` maps at pixel distances `lags`: how much detail, and at what scale, whatever its phase."""

    def __init__(self, weight: float, lags: tuple[int, ...] = (1,)):
        super().__init__(weight)
        check_lags(lags)
        self.lags = tuple(int(lag) for lag in lags)

    def statistic(self, images: torch.Tensor) -> torch.Tensor:
        return local_contrast(images, lags=self.lags)


class PaletteTerm(ImageTerm):
    """`local_covariance` maps: the contrast maps are blind to colour (a check in the wrong colours has the same
    contrast); the local colour covariance asks for detail in the reference's colours."""

    def statistic(self, images: torch.Tensor) -> torch.Tensor:
        return local_covariance(images)


#################################################################################
#                  Training speed-ups: token routing, alignment                 #
#################################################################################


def patch_features_on_grid(features: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """A ViT's tokens (B, 1 + g * g, F) (class token first, DINOv2's 16x16 patches for a 224 input) -> (B, h * w, F)
    on the denoiser's (h, w) token grid, bilinearly: the encoder saw the image resized to a square, so its grid
    covers the same image as ours, only sampled differently."""
    B, T, F_ = features.shape
    side = math.isqrt(T - 1)
    if side * side != T - 1:
        raise ValueError(f"expected a class token and a square patch grid, got {T} tokens")
    patches = features[:, 1:].transpose(1, 2).reshape(B, F_, side, side).float()  # (B, F, g, g)
    patches = F.interpolate(patches, size=grid_size, mode="bilinear", align_corners=False)  # (B, F, h, w)
    return patches.flatten(2).transpose(1, 2)  # (B, h * w, F)


class AlignmentTerm(nn.Module):
    """weight x (-cosine similarity) between a block's tokens, through a small trainable MLP, and target tokens,
    per token, averaged (REPA Eq. 3). The projector trains with the model and is saved in training checkpoints (the
    trainer's `alignment` module); it is not part of the denoiser, so a saved pipeline does not know it existed."""

    name = "alignment"

    def __init__(self, weight: float, block: int, hidden_size: int, target_dim: int, width: int = 2048):
        super().__init__()
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"{type(self).__name__} weight must be a finite number > 0, got {weight}")
        if block < 0 or width < 1:
            raise ValueError(f"block={block} must be >= 0 and width={width} >= 1")
        self.weight, self.block = weight, block
        # REPA's projector: three linear layers with SiLU, `width` wide (2048 in REPA).
        self.projector = nn.Sequential(
            nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, target_dim)
        )

    def forward(self, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """tokens (B, n, D), target (B, n, F) -> per-sample loss (B,)."""
        projected = self.projector(tokens).float()  # (B, n, F)
        similarity = F.cosine_similarity(projected, target.float().detach(), dim=-1)  # (B, n)
        return -self.weight * similarity.mean(dim=1)


class RepaTerm(AlignmentTerm):
    """REPA: block `block`'s tokens of the full pass against the frozen encoder's patch features of the clean target
    image (`patch_features_on_grid`): for real-scale configs DINOv2, the reference encoder's features, which the
    feature cache already holds for every image."""

    name = "repa"


class SelfAlignmentTerm(AlignmentTerm):
    """SRA: block `block`'s tokens of the full pass at noise t against the EMA model's block `teacher_block` tokens
    (a deeper block) at a lower noise t' = t - u, u uniform in [0, gap] (SRA's t_max = 0.2 of the schedule: 200 of
    T = 1000), on the same noise and conditions. No external encoder: the form for the synthetic set."""

    name = "self"

    def __init__(self, weight: float, block: int, teacher_block: int, gap: int, hidden_size: int, width: int = 2048):
        super().__init__(weight, block, hidden_size, hidden_size, width)
        if teacher_block <= block or gap < 1:
            raise ValueError(f"teacher_block={teacher_block} must be > block={block} and gap={gap} >= 1")
        self.teacher_block, self.gap = teacher_block, gap


@dataclass
class AlignmentInputs:
    """What the alignment terms align to, beside the model's own tokens."""

    target_features: torch.Tensor | None = None  # (B, T, F) the frozen encoder's tokens of the clean target (REPA)
    teacher: XMDPT | None = None  # the EMA model (self-alignment)
    teacher_conditions: Conditions | None = None  # its conditions of the batch


class _Captured(Exception):
    """Raised by a hook once the teacher's block of interest has run: the blocks after it are not needed."""


@contextmanager
def block_outputs(model: XMDPT, blocks: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Collects the outputs (B, n, D) of `model.blocks[i]` for i in `blocks` during the forward passes inside."""
    outputs: dict[int, torch.Tensor] = {}
    handles = [
        model.blocks[i].register_forward_hook(lambda module, args, out, i=i: outputs.__setitem__(i, out))
        for i in sorted(set(blocks))
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def teacher_tokens(
    teacher: XMDPT,
    block: int,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    conditions: Conditions,
    drop_condition: torch.Tensor | None,
) -> torch.Tensor:
    """The teacher's block `block` output (B, N, D) on all tokens, without running the blocks after it."""

    def stop(module, args, out):
        captured.append(out)
        raise _Captured

    captured: list[torch.Tensor] = []
    handle = teacher.blocks[block].register_forward_hook(stop)
    try:
        teacher(sample, timestep, conditions, drop_condition=drop_condition)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured[0]


class XMDPTLoss:
    """Full pass + masked pass, each MSE + learned-range L_vb (+ any image terms).

    scheduler: the training `DDPMScheduler`; its `prediction_type` chooses the MSE target (epsilon as published;
        v- or x0-prediction converge much faster for small models) and its `variance_type` whether L_vb is used.
    mask_ratio: fraction of target tokens dropped in the masked pass (0.3 as published); 0 disables that pass.
    condition_dropout: probability that a sample's condition y is zeroed, drawn anew for each pass as the public code
        does, which trains the unconditional model of classifier-free guidance (0.1 as published).
    image_terms: `TextureTerm`, `PaletteTerm` (beyond the paper; none as published), composed by the config.
    decode: latents (B, C, H, W) -> images (B, 3, H', W'), differentiable (the codec's `decode`); needed by image
        terms.
    route_ratio: token routing (TREAD, beyond the paper; 0 = off, as published): in both passes this fraction of the
        pass's tokens skips the blocks `route_blocks` = [start, end) and rejoins, unchanged, before block `end`
        (see `route_span`, which also says what None means). Training only: sampling runs every token.
    alignment_terms: `RepaTerm`, `SelfAlignmentTerm` (beyond the paper; none as published) on the full pass's
        tokens; their projectors are modules the trainer trains and saves with the denoiser.
    """

    def __init__(
        self,
        scheduler: DDPMScheduler | None = None,
        mask_ratio: float = 0.3,
        condition_dropout: float = 0.1,
        image_terms: Sequence[ImageTerm] = (),
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        route_ratio: float = 0.0,
        route_blocks: Sequence[int] | None = None,
        alignment_terms: Sequence[AlignmentTerm] = (),
    ):
        self.scheduler = scheduler or make_train_scheduler()
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
        if not 0 <= route_ratio < 1:
            raise ValueError(f"route_ratio must lie in [0, 1), got {route_ratio}")
        if route_blocks is not None and route_ratio == 0:
            raise ValueError("route_blocks without a route_ratio > 0 would do nothing")
        names = [term.name for term in alignment_terms]
        if len(set(names)) != len(names):
            raise ValueError(f"one alignment term of each kind, got {names}")
        self.route_ratio = route_ratio
        self.route_blocks = None if route_blocks is None else tuple(route_blocks)
        if route_blocks is not None:
            route_span(route_blocks, 10**9, 0)  # the form; the model's depth is checked per call
        self.alignment_terms = tuple(alignment_terms)
        if not 0 <= condition_dropout <= 1:
            raise ValueError(f"condition_dropout must lie in [0, 1], got {condition_dropout}")
        if image_terms and decode is None:
            raise ValueError("image terms need `decode`, the codec's latents-to-images map")
        self.mask_ratio = mask_ratio
        self.condition_dropout = condition_dropout
        self.image_terms = tuple(image_terms)
        self.decode = decode
        s = self.scheduler
        alphas_cumprod = s.alphas_cumprod.double()
        prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        betas = s.betas.double()
        # Posterior q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7), from the scheduler's own betas.
        variance = betas * (1 - prev) / (1 - alphas_cumprod)
        self._posterior_log_variance = torch.log(torch.cat([variance[1:2], variance[1:]])).float()
        self._posterior_mean_coef1 = (betas * prev.sqrt() / (1 - alphas_cumprod)).float()
        self._posterior_mean_coef2 = ((1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)).float()
        self._log_betas = torch.log(betas).float()
        self._alphas_cumprod = alphas_cumprod.float()

    @property
    def learn_sigma(self) -> bool:
        return self.scheduler.config.variance_type in ("learned", "learned_range")

    def _at(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table.to(like.device)[t].view(-1, *([1] * (like.ndim - 1)))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return x0

    def predicted_x0(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = self.scheduler.config.prediction_type
        a = self._at(self._alphas_cumprod, t, x_t)
        if kind == "epsilon":
            return (x_t - (1 - a).sqrt() * prediction) / a.sqrt()
        if kind == "v_prediction":
            return a.sqrt() * x_t - (1 - a).sqrt() * prediction
        return prediction

    def variational_bound(
        self, prediction: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample L_vb in bits per dimension, with the mean detached (Improved DDPM's hybrid objective)."""
        coef1, coef2 = self._at(self._posterior_mean_coef1, t, x_t), self._at(self._posterior_mean_coef2, t, x_t)
        true_mean = coef1 * x0 + coef2 * x_t
        true_log_var = self._at(self._posterior_log_variance, t, x_t)
        model_mean = coef1 * self.predicted_x0(prediction.detach(), x_t, t) + coef2 * x_t
        # Learned range (Improved DDPM Eq. 15): interpolate between the posterior and beta_t log-variances.
        frac = (v + 1) / 2
        model_log_var = frac * self._at(self._log_betas, t, x_t) + (1 - frac) * true_log_var
        kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def image_statistics(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [term.statistic(images) for term in self.image_terms]

    def target_statistics(self, x0: torch.Tensor) -> list[torch.Tensor]:
        """The image terms' targets: their statistics of the decoded clean latents, no gradient."""
        with torch.no_grad():
            return self.image_statistics(self.decode(x0))

    def pass_loss(
        self,
        output: torch.Tensor,
        x0: torch.Tensor,
        noise: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        targets: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """MSE (+ L_vb with learned sigma, + the image terms) of one model output (B, C or 2C, H, W), per sample.
        `targets`: `target_statistics(x0)`, when the caller has them already (both passes share them)."""
        C = x0.shape[1]
        prediction, v = output[:, :C], output[:, C:]
        loss = mean_flat((prediction.float() - self.target(x0, noise, t)) ** 2)
        if self.learn_sigma:
            loss = loss + self.variational_bound(prediction.float(), v.float(), x0, x_t, t)
        if self.image_terms:
            targets = self.target_statistics(x0) if targets is None else targets
            estimate = self.image_statistics(self.decode(self.predicted_x0(prediction.float(), x_t, t)))
            for term, ours, theirs in zip(self.image_terms, estimate, targets, strict=True):
                loss = loss + term(ours, theirs)
        return loss

    def draw(
        self, latent_shape: tuple[int, ...], num_tokens: int, generator: torch.Generator | None = None
    ) -> LossDraws:
        """Timesteps (uniform, one per sample for both passes), the noise and the condition dropout of each pass and
        the mask of the masked pass. The public loop (MDT's `forward_backward`) calls `training_losses` twice with
        the same t, and each call draws its own noise."""
        B = latent_shape[0]
        T = self.scheduler.config.num_train_timesteps
        masked = self.mask_ratio > 0
        draws = LossDraws(
            timesteps=torch.randint(0, T, (B,), generator=generator),
            noise=torch.randn(latent_shape, generator=generator),
            drop_full=torch.rand(B, generator=generator) < self.condition_dropout,
            drop_masked=torch.rand(B, generator=generator) < self.condition_dropout,
            ids_keep=random_masking(B, num_tokens, self.mask_ratio, generator) if masked else None,
        )
        draws.noise_masked = torch.randn(latent_shape, generator=generator) if masked else None
        # The additions draw after everything published, so that with them off every draw is what it was.
        if self.route_ratio > 0:
            draws.route_full = random_masking(B, num_tokens, self.route_ratio, generator)
            if masked:
                kept = draws.ids_keep.shape[1]
                draws.route_masked = random_masking(B, kept, self.route_ratio, generator)
        for term in self.alignment_terms:
            if isinstance(term, SelfAlignmentTerm):
                lower = torch.randint(0, term.gap + 1, (B,), generator=generator)
                draws.teacher_timesteps = (draws.timesteps - lower).clamp(min=0)
        return draws

    def __call__(
        self,
        model: XMDPT,
        latents: torch.Tensor,
        conditions: Conditions,
        generator: torch.Generator | None = None,
        draws: LossDraws | None = None,
        alignment: AlignmentInputs | None = None,
    ) -> LossOutput:
        """One training loss on clean target latents (B, C, H, W) and their `conditions` (from
        `model.encode_conditions`, with gradient: the aggregation network trains through both passes).

        Both passes see the same t; the noise and the condition dropout are drawn for each pass, as published. `draws`
        (from `draw`) fixes the randomness; otherwise it is drawn from `generator`. `alignment`: the targets of the
        alignment terms (the frozen encoder's features of the target, the EMA teacher), when there are any.
        """
        if draws is None:
            draws = self.draw(tuple(latents.shape), model.num_tokens, generator)
        draws = draws.to(latents.device)
        span = self.span(model) if self.route_ratio > 0 else None
        t, noise = draws.timesteps, draws.noise.to(latents.dtype)
        x_t = self.scheduler.add_noise(latents, noise, t)
        # The image terms' targets are decoded once per step, not once per pass (an SD-VAE decode is not cheap).
        targets = self.target_statistics(latents) if self.image_terms else None
        with block_outputs(model, [term.block for term in self.alignment_terms]) as tokens:
            output = model(x_t, t, conditions, drop_condition=draws.drop_full, **self.routing(draws.route_full, span))
        full = self.pass_loss(output, latents, noise, x_t, t, targets)
        aligned = {}
        if self.alignment_terms:
            aligned = self.alignment_losses(model, tokens, latents, noise, draws, alignment, span)
        masked = None
        if draws.ids_keep is not None:
            noise = noise if draws.noise_masked is None else draws.noise_masked.to(latents.dtype)
            x_t = self.scheduler.add_noise(latents, noise, t)
            route = self.routing(draws.route_masked, span)
            output = model(x_t, t, conditions, drop_condition=draws.drop_masked, ids_keep=draws.ids_keep, **route)
            masked = self.pass_loss(output, latents, noise, x_t, t, targets)
        total = full.mean() + (masked.mean() if masked is not None else 0.0)
        for value in aligned.values():
            total = total + value.mean()
        return LossOutput(
            loss=total,
            full=full.detach(),
            masked=None if masked is None else masked.detach(),
            timesteps=t,
            alignment={name: value.detach() for name, value in aligned.items()},
        )

    def span(self, model: XMDPT) -> tuple[int, int]:
        """The route's blocks: route_blocks, else a fused model's span (SPRINT), else TREAD's default."""
        blocks = self.route_blocks if self.route_blocks is not None else model.fusion_span
        return route_span(blocks, model.config.depth, model.config.decode_layers)

    @staticmethod
    def routing(ids: torch.Tensor | None, span: tuple[int, int] | None) -> dict:
        """The model's `route` keyword for one pass; none at all without routing, so that any denoiser with the
        published signature (the public schedule's, in bench/) still trains."""
        return {} if ids is None or span is None else {"route": TokenRoute(ids, *span)}

    def alignment_losses(
        self,
        model: XMDPT,
        tokens: dict[int, torch.Tensor],
        latents: torch.Tensor,
        noise: torch.Tensor,
        draws: LossDraws,
        inputs: AlignmentInputs | None,
        span: tuple[int, int] | None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss of each alignment term on the full pass's block tokens `tokens` (B, N or R, D); a block
        inside the routed span saw only the routed tokens, so the targets are taken at those positions."""
        inputs = inputs or AlignmentInputs()
        losses = {}
        for term in self.alignment_terms:
            if isinstance(term, RepaTerm):
                if inputs.target_features is None:
                    raise ValueError("the REPA term needs the frozen encoder's features of the target image")
                target = patch_features_on_grid(inputs.target_features, model.grid_size)  # (B, N, F)
            else:
                if inputs.teacher is None or inputs.teacher_conditions is None or draws.teacher_timesteps is None:
                    raise ValueError("the self-alignment term needs the EMA teacher, its conditions and its draws")
                lower = draws.teacher_timesteps
                x_lower = self.scheduler.add_noise(latents, noise, lower)
                target = teacher_tokens(
                    inputs.teacher, term.teacher_block, x_lower, lower, inputs.teacher_conditions, draws.drop_full
                )  # (B, N, D)
            if span is not None and span[0] <= term.block < span[1]:
                target = gather_tokens(target, draws.route_full)  # (B, R, F)
            losses[term.name] = term(tokens[term.block], target)
        return losses
