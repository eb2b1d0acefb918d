"""The public X-MDPT code's schedule of work, for the benchmarks and the equivalence tests only.

The public code (reference Sec. 6) runs the conditional and unconditional passes of guidance one after the other,
recomputes the aggregation vector in every pass, and pushes the reference latent's tokens through every block in
every pass, although only the masked pass of training reads them. Both wrappers below call the model's own
`encode_conditions` and `forward` and add only that extra work around them, so they compute whatever the model
computes, with every part it has (pose map, reference attention, refiner), and cannot drift from it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from xmdpt.models.cache import FeatureCache
from xmdpt.models.xmdpt import XMDPT, Conditions
from xmdpt.pipeline import XMDPTPipeline, guidance_ramp


def unused_reference_pass(model: XMDPT, conditions: Conditions, timestep: torch.Tensor, drop: torch.Tensor, blocks):
    """The public code's reference tokens through `blocks`, with the pass's conditioning; the result is unused."""
    with torch.no_grad():
        keep = (~drop).to(conditions.y.dtype)[:, None]
        c = model.t_embedder(timestep.expand(drop.shape[0])) + conditions.y * keep
        x = conditions.reference_tokens
        for block in blocks:
            x = block(x, c)


class PublicSchedulePipeline(XMDPTPipeline):
    """`XMDPTPipeline` with the public schedule of work in each sampling step; the loop is the pipeline's own."""

    inputs: tuple | None = None  # the arguments of `XMDPT.encode_conditions`, re-encoded in every pass

    def conditions_from(self, inputs: tuple) -> Conditions:
        self.inputs = inputs
        return self.denoiser.encode_conditions(*inputs)

    def encode_conditions(self, reference_image: torch.Tensor, pose_image: torch.Tensor) -> Conditions:
        return self.conditions_from(self.encode_inputs(reference_image, pose_image))

    reference_cache_size = 0  # the public code encodes every image it is given

    def guided_prediction(self, latents, t, conditions, guidance_scale, power, cache=None):
        if cache is not None and type(cache) is not FeatureCache:
            raise ValueError("the public schedule has no feature cache: sample it with cache='none'")
        model, B = self.denoiser, latents.shape[0]

        def one_pass(dropped: bool) -> torch.Tensor:
            drop = torch.full((B,), dropped, device=latents.device)
            conditions = model.encode_conditions(*self.inputs)  # every pass, as published
            out = model(latents, t, conditions, drop_condition=drop)
            unused_reference_pass(model, conditions, t, drop, model.blocks)
            return out

        uncond = one_pass(True)  # the public code runs it even where the scale is 1
        if guidance_scale == 1.0:
            return one_pass(False)
        cond = one_pass(False)
        T = self.scheduler.config.num_train_timesteps
        return uncond + guidance_ramp(guidance_scale, t, T, power).to(uncond.dtype) * (cond - uncond)


class PublicScheduleDenoiser(nn.Module):
    """The denoiser as the public training loop runs it: conditions re-encoded from `inputs` in every pass (the
    `conditions` argument is ignored), and the reference tokens through every block; the masked pass's own context
    already runs the first depth - decode_layers of them."""

    def __init__(self, model: XMDPT, inputs: tuple):
        super().__init__()
        self.model, self.inputs, self.num_tokens = model, inputs, model.num_tokens

    def forward(self, sample, timestep, conditions=None, drop_condition=None, ids_keep=None) -> torch.Tensor:
        model = self.model
        conditions = model.encode_conditions(*self.inputs)
        out = model(sample, timestep, conditions, drop_condition=drop_condition, ids_keep=ids_keep)
        split = model.config.depth - model.config.decode_layers
        drop = drop_condition if drop_condition is not None else torch.zeros(sample.shape[0], dtype=torch.bool)
        unused_reference_pass(model, conditions, timestep, drop, model.blocks[split if ids_keep is not None else 0 :])
        return out
