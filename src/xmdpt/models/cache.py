"""Training-free feature caching across sampling steps: what a block computes changes little from one step to the
next, so some steps reuse it instead of computing it.

- `FORACache` (FORA, Selvaraju et al. 2024, "Fast-Forward Caching in Diffusion Transformer Acceleration"): every
  N-th step runs in full and stores each block's attention, reference cross-attention and MLP outputs; the N - 1
  steps after it reuse them. The adaLN gates and shifts are recomputed at every step from the current timestep, so
  a reused step still follows the schedule's conditioning; only the expensive layers are skipped.
- `TeaCache` (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model"): an
  adaptive skip of the whole block stack. Each step measures how much the first block's timestep-modulated input
  changed (relative L1 distance to the previous step's), and accumulates it; while the sum stays under a threshold
  the step adds the last computed residual of the stack (output minus input) instead of running the blocks. TeaCache
  rescales the distance with a polynomial fitted per model; with no fit for these models the distance is used as is,
  so the threshold is in its units. The first and the last step always run in full.

A cache is the state of one sampling call (the pipeline makes one per call, so threads sharing a pipeline do not
share it) and is handed to `XMDPT.forward(..., cache=)`; the denoiser asks it what to do. A step whose batch differs
from the stored one (guided steps run the conditional and unconditional halves as one batch of 2B, unguided ones B)
runs in full and stores anew.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from xmdpt.settings import parse_cache


class FeatureCache:
    """No caching: every step computes everything. The base of the two methods; `begin_step` is called by the
    sampling loop before each model call."""

    def __init__(self) -> None:
        self.step = -1
        self.num_steps = 0
        self.full_steps = 0  # how many model calls ran the blocks in full (for benchmarks and tests)
        self.calls = 0

    def begin_step(self, index: int, num_steps: int) -> None:
        self.step, self.num_steps = index, num_steps
        self.calls += 1

    # The denoiser's two questions; the defaults compute everything.
    def skip_blocks(self, x: torch.Tensor, modulated: Callable[[], torch.Tensor]) -> bool:
        """TeaCache's question, once per call with the stack's input x (B, N, D) and a function giving the first
        block's timestep-modulated input (B, N, D), computed only by a cache that looks at it: skip the stack?"""
        self.full_steps += 1
        return False

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no stored residual")

    def store_residual(self, before: torch.Tensor, after: torch.Tensor) -> None:
        pass

    def layer(self, block: int, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """FORA's question, once per layer: the output of layer `name` of block `block`, computed or reused."""
        return compute()


class FORACache(FeatureCache):
    """Full steps every `interval` steps (and whenever the batch changes); the others reuse the layer outputs."""

    def __init__(self, interval: int) -> None:
        super().__init__()
        if interval < 1:
            raise ValueError(f"FORA's interval must be >= 1, got {interval}")
        self.interval = interval
        self.stored: dict[tuple[int, str], torch.Tensor] = {}
        self.reuse = False

    def skip_blocks(self, x: torch.Tensor, modulated: Callable[[], torch.Tensor]) -> bool:
        stale = not self.stored or next(iter(self.stored.values())).shape[0] != x.shape[0]
        self.reuse = not stale and self.step % self.interval != 0
        if not self.reuse:
            self.stored.clear()
            self.full_steps += 1
        return False  # FORA never skips the stack as a whole: the layers decide

    def layer(self, block: int, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (block, name)
        if self.reuse and key in self.stored:
            return self.stored[key]
        out = compute()
        self.stored[key] = out
        return out


class TeaCache(FeatureCache):
    """Skip the stack while the accumulated relative L1 change of the modulated input stays under `threshold`."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        if threshold < 0:
            raise ValueError(f"TeaCache's threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.previous: torch.Tensor | None = None  # the last call's modulated input
        self.accumulated = 0.0
        self.stored: torch.Tensor | None = None  # the last full call's residual of the block stack

    def skip_blocks(self, x: torch.Tensor, modulated: Callable[[], torch.Tensor]) -> bool:
        current = modulated()
        previous, self.previous = self.previous, current
        edge = self.step <= 0 or self.step >= self.num_steps - 1
        if edge or previous is None or previous.shape != current.shape or self.stored is None:
            skip = False
        else:
            change = ((current - previous).abs().mean() / previous.abs().mean().clamp(min=1e-12)).item()
            self.accumulated += change
            skip = self.accumulated < self.threshold
        if not skip:
            self.accumulated = 0.0
            self.full_steps += 1
        return skip

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.stored

    def store_residual(self, before: torch.Tensor, after: torch.Tensor) -> None:
        self.stored = after - before


def make_feature_cache(setting: str) -> FeatureCache:
    """The cache of one sampling call for a setting "none", "fora:N" or "teacache:D" (see `parse_cache`)."""
    method, value = parse_cache(setting)
    if method == "fora":
        return FORACache(int(value))
    if method == "teacache":
        return TeaCache(value)
    return FeatureCache()
