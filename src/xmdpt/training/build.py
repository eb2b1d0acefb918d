"""Build the parts a training run needs from its config: encoders, codec, denoiser, data sets."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.nn as nn

from xmdpt.conditioning import LearnedImageEncoder, PixelCodec, VAECodec
from xmdpt.conditioning.encoders import dinov2_encoders
from xmdpt.data.deepfashion import Augment, FolderPairs, PairDataset, PidmPairs, deepfashion_csv, market1501
from xmdpt.errors import InputError
from xmdpt.models.xmdpt import XMDPT, XMDPT_PRESETS
from xmdpt.training.config import TrainConfig

log = logging.getLogger(__name__)


def build_encoders(config: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """(pose encoder, reference encoder). DINOv2 ones are frozen; learned ones train with the denoiser."""
    c = config.conditioning
    if c.encoder == "learned":
        size = list(config.data.size)
        return (
            LearnedImageEncoder(image_size=size, width=c.learned_width, input_transform="unit"),
            LearnedImageEncoder(
                image_size=size, width=c.learned_width, input_transform="signed", contrast_input=c.learned_contrast
            ),
        )
    return dinov2_encoders(c.pose_encoder, c.reference_encoder, c.public_quirks)


def build_codec(config: TrainConfig) -> nn.Module:
    c = config.conditioning
    return VAECodec.from_vae(c.vae) if c.codec == "vae" else PixelCodec(factor=c.pixel_factor)


def build_denoiser(config: TrainConfig, codec: nn.Module, pose_encoder: nn.Module, reference_encoder: nn.Module):
    m = config.model
    height, width = config.data.size
    f = codec.downsample_factor
    if height % (f * m.patch_size) or width % (f * m.patch_size):
        raise InputError(f"data.size {height}x{width} is not divisible by codec factor {f} x patch {m.patch_size}")
    if m.preset and m.preset not in XMDPT_PRESETS:
        raise InputError(f"model.preset={m.preset!r}: choose one of {', '.join(XMDPT_PRESETS)} or null")
    sizes = dict(XMDPT_PRESETS[m.preset]) if m.preset else {}
    for key in ("hidden_size", "depth", "num_heads"):
        if getattr(m, key) is not None:
            sizes[key] = getattr(m, key)
    missing = [k for k in ("hidden_size", "depth", "num_heads") if k not in sizes]
    if missing:
        raise InputError(f"model.preset is null: give model.{', model.'.join(missing)}")
    return XMDPT(
        sample_size=[height // f, width // f],
        patch_size=m.patch_size,
        in_channels=codec.latent_channels,
        learn_sigma=m.learn_sigma,
        decode_layers=min(m.decode_layers, sizes["depth"]),
        side_interpolater=config.objective.mask_ratio > 0,
        pose_feature_dim=pose_encoder.feature_dim,
        pose_num_tokens=pose_encoder.num_tokens,
        reference_feature_dim=reference_encoder.feature_dim,
        reference_num_tokens=reference_encoder.num_tokens,
        pose_map_channels=3 * f * f if m.pose_map else 0,
        reference_layers=m.reference_layers,
        refine_channels=m.refine_channels,
        fusion_blocks=None if m.fusion_blocks is None else list(m.fusion_blocks),
        **sizes,
    )


def build_dataset(config: TrainConfig, split: str, train: bool) -> PairDataset:
    d = config.data
    size = tuple(d.size)
    augment = Augment(scale=d.scale, flip=d.flip, swap=d.swap) if train else Augment.off()
    common = dict(image_size=size, train=train, augment=augment, fail_fast=d.fail_fast)
    root = Path(d.root)
    if d.layout == "synthetic":
        ensure_synthetic(config)
    if d.layout in ("deepfashion", "synthetic"):
        return deepfashion_csv(root, split, **common)
    if d.layout == "market":
        return market1501(root, split, **common)
    if d.layout == "pidm":
        return PidmPairs(root=root, split=split, **common)
    return FolderPairs(root=root, **common)


def synth_config(config: TrainConfig):
    """The `SynthConfig` of a run on the synthetic layout."""
    from xmdpt.data.synthetic import SynthConfig

    d = config.data
    return SynthConfig(
        num_identities=d.synth_identities,
        poses_per_identity=d.synth_poses,
        size=tuple(d.size),
        seed=d.synth_seed,
        pattern_cell=tuple(d.synth_pattern_cell),
    )


def ensure_synthetic(config: TrainConfig) -> None:
    """Generate the synthetic set into data.root unless a set with these settings is already there."""
    import json

    from xmdpt.data.synthetic import SynthConfig, generate

    d = config.data
    synth = synth_config(config)
    marker = Path(d.root) / "synth.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        wanted = {"num_identities": synth.num_identities, "seed": synth.seed, "pattern_cell": list(synth.pattern_cell)}
        saved.setdefault("pattern_cell", list(SynthConfig.pattern_cell))  # a set from before the option
        if all(saved.get(k) == v for k, v in wanted.items()):
            return
        raise InputError(f"{d.root}: holds another synthetic set (synth.json differs); choose another data.root")
    log.info("generating the synthetic set in %s", d.root)
    generate(d.root, synth)


def build_objective(config: TrainConfig, codec: nn.Module, denoiser: XMDPT, reference_encoder: nn.Module):
    """The training objective with the terms and speed-ups the config switches on (none as published). The
    alignment terms' projectors are sized for `denoiser` and, for REPA, for `reference_encoder`'s features."""
    from xmdpt.diffusion import (
        PaletteTerm,
        RepaTerm,
        SelfAlignmentTerm,
        TextureTerm,
        XMDPTLoss,
        make_train_scheduler,
    )

    o = config.objective
    terms = []
    if o.texture_weight > 0:
        terms.append(TextureTerm(o.texture_weight, tuple(o.texture_lags)))
    if o.palette_weight > 0:
        terms.append(PaletteTerm(o.palette_weight))
    hidden = denoiser.config.hidden_size
    alignment = []
    if o.repa_weight > 0:
        alignment.append(RepaTerm(o.repa_weight, o.repa_block, hidden, reference_encoder.feature_dim, o.align_width))
    if o.self_align_weight > 0:
        student, teacher = o.self_align_blocks
        alignment.append(
            SelfAlignmentTerm(o.self_align_weight, student, teacher, o.self_align_gap, hidden, o.align_width)
        )
    return XMDPTLoss(
        make_train_scheduler(o.prediction_type, config.model.learn_sigma),
        mask_ratio=o.mask_ratio,
        condition_dropout=o.condition_dropout,
        image_terms=terms,
        decode=codec.decode,
        route_ratio=o.route_ratio,
        route_blocks=o.route_blocks,
        alignment_terms=alignment,
    )
