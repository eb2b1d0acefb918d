"""Guidance options checked where no sampler is loaded (the CLI, `xmdpt_default.json`): kept apart from the
pipeline, which imports diffusers."""

from __future__ import annotations

from collections.abc import Sequence

from xmdpt.errors import InputError


def check_guidance_interval(
    interval: Sequence[float] | None, num_train_timesteps: int = 1000
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
