"""Load the public X-MDPT checkpoints (`model{step}.pt`, `ema_0.9999_{step}.pt`: plain `torch.save(state_dict)`).

The public key names are flat (`mlp_dino_pose.*`, `sideblocks.*`); `XMDPT`'s load hook (`rename_legacy_keys`) maps them
onto its modules, so the state dict loads as it is. What the converter adds is reading the architecture off the tensor
shapes, checking that the file is such a checkpoint, and writing a `save_pretrained` folder. The public models are
square: a 256-token checkpoint is a 16x16 grid of a 32x32 latent (256x256 images).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from xmdpt.errors import InputError, describe
from xmdpt.models.xmdpt import XMDPT
from xmdpt.settings import (
    PUBLISHED_POSE_ENCODER,
    PUBLISHED_REFERENCE_ENCODER,
    PUBLISHED_VAE,
    SAMPLING_PRESETS,
)

logger = logging.getLogger(__name__)

REQUIRED_KEYS = (
    "pos_embed",
    "x_embedder.proj.weight",
    "t_embedder.mlp.0.weight",
    "blocks.0.attn.qkv.weight",
    "blocks.0.attn.rel_pos_bias.relative_position_bias_table",
    "final_layer.linear.weight",
    "mlp_dino_pose.0.weight",
    "mlp_dino_img.0.weight",
    "conv1d_pose.0.weight",
    "conv1d_global.0.weight",
    "conv1d_local.0.weight",
    "mlp_final.0.weight",
)


def load_public_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a public checkpoint safely (`weights_only=True`: no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {'a folder, not a checkpoint file' if path.is_dir() else 'no such file'}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:  # the file may be fine: say so rather than call it no checkpoint
        raise InputError(f"{path}: cannot read the checkpoint: permission denied") from None
    except Exception as err:  # torch.load fails in many ways on a file that is not a checkpoint
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({describe(err)})") from None
    # Some training scripts wrap the weights; accept the usual wrappers.
    for wrapper in ("ema", "model", "state_dict"):
        inner = state.get(wrapper) if isinstance(state, dict) else None
        if isinstance(inner, dict) and any(str(k).endswith("pos_embed") for k in inner):
            state = inner
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise InputError(f"{path}: not an X-MDPT checkpoint (missing {', '.join(missing[:3])})")
    return state


def config_from_state_dict(
    state: dict[str, torch.Tensor], grid_size: tuple[int, int] | None = None, decode_layers: int = 2
) -> dict:
    """The XMDPT constructor arguments that produce these tensor shapes. The weights do not record
    `decode_layers` (where the side-interpolater sits); the public models use 2."""
    num_tokens, hidden_size = state["pos_embed"].shape[1:]
    if grid_size is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise InputError(f"{num_tokens} tokens is not a square grid: give the grid size (height x width)")
        grid_size = (side, side)
    if grid_size[0] * grid_size[1] != num_tokens:
        raise InputError(f"grid {grid_size[0]}x{grid_size[1]} does not hold the checkpoint's {num_tokens} tokens")
    _, in_channels, patch_size, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    num_heads = state["blocks.0.attn.rel_pos_bias.relative_position_bias_table"].shape[1]
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch_size * patch_size)
    return dict(
        sample_size=[grid_size[0] * patch_size, grid_size[1] * patch_size],
        patch_size=int(patch_size),
        in_channels=int(in_channels),
        hidden_size=int(hidden_size),
        depth=int(depth),
        num_heads=int(num_heads),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size,
        learn_sigma=bool(out_channels == 2 * in_channels),
        decode_layers=decode_layers,
        side_interpolater="sideblocks.0.attn.qkv.weight" in state,
        pose_feature_dim=int(state["mlp_dino_pose.0.weight"].shape[1]),
        pose_num_tokens=int(state["conv1d_pose.0.weight"].shape[1]),
        reference_feature_dim=int(state["mlp_dino_img.0.weight"].shape[1]),
        reference_num_tokens=int(state["conv1d_global.0.weight"].shape[1]),
    )


def convert_public_checkpoint(
    path: str | Path,
    out_dir: str | Path | None = None,
    grid_size: tuple[int, int] | None = None,
    decode_layers: int = 2,
) -> XMDPT:
    """Build our XMDPT from a public checkpoint, check it loads exactly, and optionally `save_pretrained` it."""
    state = load_public_state_dict(path)
    try:  # every error names the checkpoint once, these as the others
        config = config_from_state_dict(state, grid_size, decode_layers)
        model = XMDPT(**config)
    except ValueError as err:  # a grid or decode_layers that does not fit this checkpoint's model
        raise InputError(f"{path}: {err}") from None
    ours = model.state_dict()
    # The index buffers are derived from the grid; a mismatch means the grid (or the file) is wrong.
    for key, value in state.items():
        if key.endswith("relative_position_index") and key in ours and not torch.equal(value, ours[key]):
            raise InputError(f"{path}: {key} does not match a {config['sample_size']} latent grid")
    if not config["side_interpolater"]:
        state = {k: v for k, v in state.items() if k != "mask_token"}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(
            f"{path}: not an X-MDPT checkpoint of a known layout "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir)
        logger.info("wrote %s (%s parameters)", out_dir, f"{model.num_parameters():,}")
    return model


def load_component(what: str, option: str, name: str | Path, load):
    """`load()`, or one line naming the component, where it was looked for, and the option that takes a folder."""
    from xmdpt.default_model import quiet_loading

    try:
        with quiet_loading():
            return load()
    except (InputError, OSError, ValueError) as err:
        if Path(name).exists():
            raise InputError(f"{what} {name}: cannot load it ({str(err).splitlines()[0][:300]})") from None
        raise InputError(
            f"{what} {name}: not a local folder, and not in the Hugging Face cache while the Hub cannot be reached; "
            f"download it once with a connection, or pass a local folder with {option}"
        ) from None


def convert_public_pipeline(
    path: str | Path,
    out_dir: str | Path,
    vae: str | Path = PUBLISHED_VAE,
    pose_encoder: str | Path = PUBLISHED_POSE_ENCODER,
    reference_encoder: str | Path = PUBLISHED_REFERENCE_ENCODER,
    grid_size: tuple[int, int] | None = None,
    decode_layers: int = 2,
    sampling: str = "published",
):
    """A complete `XMDPTPipeline` folder from a public checkpoint: the converted denoiser, the SD-VAE codec, the two
    DINOv2 encoders with the public code's input quirks, and the sampling defaults of `SAMPLING_PRESETS[sampling]`:
    "published" (the public respaced DDIM, 50 steps, guidance 2.0 at every step) or "fast". The image size follows
    from the checkpoint's grid and the VAE's factor (256x256 for the released models)."""
    if sampling not in SAMPLING_PRESETS:
        raise InputError(f"sampling={sampling!r}: choose one of {', '.join(SAMPLING_PRESETS)}")
    from xmdpt.conditioning import VAECodec
    from xmdpt.conditioning.encoders import dinov2_encoder
    from xmdpt.diffusion import make_train_scheduler
    from xmdpt.pipeline import XMDPTPipeline, make_sampling_scheduler

    denoiser = convert_public_checkpoint(path, None, grid_size, decode_layers)
    pose = load_component("pose encoder", "--pose-encoder", pose_encoder, lambda: dinov2_encoder(pose_encoder, "pose"))
    reference = load_component(
        "reference encoder",
        "--reference-encoder",
        reference_encoder,
        lambda: dinov2_encoder(reference_encoder, "reference"),
    )
    codec = load_component("VAE", "--vae", vae, lambda: VAECodec.from_vae(vae))
    c = denoiser.config
    expected = {
        "pose encoder": ((c.pose_feature_dim, c.pose_num_tokens), (pose.feature_dim, pose.num_tokens)),
        "reference encoder": (
            (c.reference_feature_dim, c.reference_num_tokens),
            (reference.feature_dim, reference.num_tokens),
        ),
    }
    for what, (want, got) in expected.items():
        if want != got:
            raise InputError(
                f"{path}: the checkpoint expects a {what} of width {want[0]} with {want[1]} tokens, "
                f"the one given has width {got[0]} with {got[1]} tokens"
            )
    if codec.latent_channels != c.in_channels:
        raise InputError(
            f"{path}: the checkpoint takes {c.in_channels} latent channels, the VAE gives {codec.latent_channels}"
        )
    sampler, defaults = SAMPLING_PRESETS[sampling]
    scheduler = make_sampling_scheduler(sampler, make_train_scheduler("epsilon", c.learn_sigma).config)
    pipe = XMDPTPipeline(denoiser, codec, pose, reference, scheduler, **defaults)
    pipe.save_pretrained(out_dir)
    logger.info("wrote %s: a %dx%d pipeline", out_dir, *pipe.image_size)
    return pipe
