"""Conditioning encoders: images -> token features (B, tokens, width) for the aggregation network.

One small interface: a `ModelMixin` whose `forward(images)` takes (B, 3, H, W) in [0, 1] and returns
(B, num_tokens, feature_dim), with `num_tokens` and `feature_dim` as properties. Two implementations:

- `DinoV2Encoder`: the published setup, a frozen DINOv2 through `transformers` (ViT-B/14 for the pose skeleton,
  ViT-g/14 for the reference image), tokens = [cls, patches] after the final LayerNorm.
- `LearnedImageEncoder`: a small convolutional tokenizer trained with the denoiser; needs no pretrained weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from xmdpt.errors import InputError

# How pixels in [0, 1] are mapped before the encoder. The public X-MDPT code feeds DINOv2 the reference in [-1, 1]
# ("signed") and the skeleton in [0, 1] ("unit"), without ImageNet normalisation; checkpoints trained that way need
# the same quirk. "imagenet" is what DINOv2 was trained with.
INPUT_TRANSFORMS = ("unit", "signed", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def transform_input(images: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "unit":
        return images
    if mode == "signed":
        return images * 2 - 1
    if mode == "imagenet":
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (images - mean) / std
    raise ValueError(f"unknown input transform {mode!r}; choose one of {INPUT_TRANSFORMS}")


DINO_IMAGE_SIZE = 224


def neighbour_differences(images: torch.Tensor, lag: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """|right - self| and |below - self| per channel, `lag` pixels apart, each (B, C, H, W) with zeros in the last
    `lag` columns / rows: where an image has horizontal and vertical detail, whatever its phase (stripes half a period
    apart give the same maps)."""
    dx = F.pad((images[..., :, lag:] - images[..., :, :-lag]).abs(), (0, lag))  # (B, C, H, W)
    dy = F.pad((images[..., lag:, :] - images[..., :-lag, :]).abs(), (0, 0, 0, lag))  # (B, C, H, W)
    return dx, dy


def hub_position_table(table: torch.Tensor, grid: int, offset: float = 0.1) -> torch.Tensor:
    """DINOv2's position table (1, 1 + M * M, D) resampled to a `grid` x `grid` patch grid the way the torch.hub
    model does it (facebookresearch/dinov2 `interpolate_pos_encoding`): bicubic with the scale factor
    (grid + 0.1) / M and no antialiasing. transformers resamples to the exact size instead, which maps coordinates
    differently (about 3 % apart at 37 -> 16): features meant for checkpoints trained on the hub model need this."""
    cls_pos, patches = table[:, :1], table[:, 1:]
    M, dim = math.isqrt(patches.shape[1]), table.shape[-1]
    patches = patches.reshape(1, M, M, dim).permute(0, 3, 1, 2).float()  # (1, D, M, M)
    scale = (grid + offset) / M
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if patches.shape[-2:] != (grid, grid):
        raise ValueError(f"cannot resample a {M}x{M} position table to {grid}x{grid}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(table.dtype)  # (1, grid * grid, D)
    return torch.cat([cls_pos, patches], dim=1)


class DinoV2Encoder(ModelMixin, ConfigMixin):
    """Frozen DINOv2 (transformers `Dinov2Model`): (B, 3, H, W) in [0, 1] -> (B, 1 + patches, width).

    Build it from the Hub or a local folder with `DinoV2Encoder.from_dinov2("facebook/dinov2-giant")`; it then saves
    and loads as one of ours (`save_pretrained` writes the DINOv2 config into ours and the weights as safetensors).
    """

    @register_to_config
    def __init__(
        self,
        dinov2_config: dict | None = None,
        image_size: int = DINO_IMAGE_SIZE,
        input_transform: str = "signed",
        antialias: bool = False,
    ):
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        if input_transform not in INPUT_TRANSFORMS:
            raise ValueError(f"unknown input transform {input_transform!r}; choose one of {INPUT_TRANSFORMS}")
        self.dino = Dinov2Model(Dinov2Config(**(dinov2_config or {})))
        self.dino.requires_grad_(False)
        self.dino.eval()

    @classmethod
    def from_dinov2(cls, name_or_path: str | Path, **kwargs) -> DinoV2Encoder:
        """Wrap pretrained DINOv2 weights (a Hub id such as `facebook/dinov2-base`, or a local folder)."""
        from transformers import Dinov2Model

        try:
            dino = Dinov2Model.from_pretrained(str(name_or_path))
        except OSError as err:
            raise InputError(f"{name_or_path}: cannot load DINOv2 weights ({str(err).splitlines()[0]})") from None
        config, state = dino.config.to_diff_dict(), dino.state_dict()
        patch = dino.config.patch_size
        grid = kwargs.get("image_size", DINO_IMAGE_SIZE) // patch
        key = "embeddings.position_embeddings"
        if state[key].shape[1] != 1 + grid * grid:
            # Resample the position table once, here, as DINOv2's own code does at run time (the public X-MDPT
            # code runs the torch.hub model); the stored table then fits the input and transformers uses it as is.
            state[key] = hub_position_table(state[key], grid)
            config["image_size"] = grid * patch
        encoder = cls(dinov2_config=config, **kwargs)
        encoder.dino.load_state_dict(state)
        return encoder

    @property
    def feature_dim(self) -> int:
        return self.dino.config.hidden_size

    @property
    def num_tokens(self) -> int:
        return 1 + (self.config.image_size // self.dino.config.patch_size) ** 2

    def train(self, mode: bool = True) -> DinoV2Encoder:
        # Frozen: stays in eval mode whatever the surrounding module does.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        # The public code resizes bicubic without antialiasing; `antialias=True` is the better-behaved choice.
        x = F.interpolate(
            images, size=(size, size), mode="bicubic", align_corners=False, antialias=self.config.antialias
        )
        x = transform_input(x, self.config.input_transform).to(self.dtype)
        return self.dino(pixel_values=x).last_hidden_state  # (B, 1 + patches, width), after the final LayerNorm


class LearnedImageEncoder(ModelMixin, ConfigMixin):
    """A small convolutional tokenizer trained jointly with the denoiser, for models without pretrained features.

    Three stride-2 convolutions turn the image (resized to `image_size`) into a grid of tokens; a mean token is
    prepended, mirroring DINOv2's [cls, patches] layout, then a LayerNorm.

    contrast_input (beyond the paper): also feed the image's local contrast, |horizontal| and |vertical| neighbour
    differences per colour (6 channels), through a convolution added to the first layer's output. Why: whether a
    garment is striped, checked or plain is a phase-blind fact that a linear layer on pixels cannot see and that an
    MSE-trained encoder has little reason to learn, so the pattern has to be handed to it (docs/default-model.md,
    "What the condition knows of the pattern", measures what the condition y knows). The convolution starts at zero,
    so adding it to a trained encoder changes nothing until it trains.
    """

    @register_to_config
    def __init__(
        self,
        image_size: tuple[int, int] | list[int] = (64, 44),
        width: int = 64,
        input_transform: str = "signed",
        contrast_input: bool = False,
    ):
        super().__init__()
        if input_transform not in INPUT_TRANSFORMS:
            raise ValueError(f"unknown input transform {input_transform!r}; choose one of {INPUT_TRANSFORMS}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
        )
        self.contrast = None
        if contrast_input:
            self.contrast = nn.Conv2d(6, width // 2, 3, stride=2, padding=1)
            nn.init.zeros_(self.contrast.weight)
            nn.init.zeros_(self.contrast.bias)
        self.norm = nn.LayerNorm(width)

    @property
    def feature_dim(self) -> int:
        return self.config.width

    @property
    def num_tokens(self) -> int:
        h, w = self.config.image_size
        return 1 + -(-h // 8) * -(-w // 8)  # each stride-2 conv (padding 1) rounds up

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = tuple(self.config.image_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = transform_input(images, self.config.input_transform).to(self.dtype)  # (B, 3, H, W)
        if self.contrast is None:
            x = self.stem(x)  # (B, W, h, w)
        else:
            x = self.stem[0](x) + self.contrast(torch.cat(neighbour_differences(x), dim=1))  # (B, W / 2, H/2, W/2)
            x = self.stem[1:](x)  # (B, W, h, w)
        tokens = x.flatten(2).transpose(1, 2)  # (B, h * w, W)
        return self.norm(torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1))  # (B, 1 + h * w, W)


def dinov2_encoder(name_or_path: str | Path, role: str, public_quirks: bool = True) -> DinoV2Encoder:
    """The pose or reference encoder (`role`) from a DINOv2 Hub id or local folder. With `public_quirks`, as the
    published models were trained: the skeleton enters in [0, 1] and the reference in [-1, 1], resized without
    antialiasing (reference Sec. 3); otherwise ImageNet-normalised with antialiasing, for new models."""
    if role not in ("pose", "reference"):
        raise ValueError(f"role must be 'pose' or 'reference', got {role!r}")
    transform = ("unit" if role == "pose" else "signed") if public_quirks else "imagenet"
    return DinoV2Encoder.from_dinov2(name_or_path, input_transform=transform, antialias=not public_quirks)


def dinov2_encoders(
    pose: str | Path, reference: str | Path, public_quirks: bool = True
) -> tuple[DinoV2Encoder, DinoV2Encoder]:
    """(pose encoder, reference encoder): see `dinov2_encoder`."""
    return dinov2_encoder(pose, "pose", public_quirks), dinov2_encoder(reference, "reference", public_quirks)


def encode_features(
    pose_encoder: torch.nn.Module,
    reference_encoder: torch.nn.Module,
    reference_image: torch.Tensor,
    pose_image: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two encoders' token features: (pose (B, T_p, W_p), reference (B, T_r, W_r)) from the rendered target
    pose (B, 3, H, W) in [0, 1] and the reference image (B, 3, H, W) in [-1, 1]. The one place that says which image
    goes to which encoder in which range: sampling, training and the feature cache call it."""
    return pose_encoder(pose_image), encode_reference(reference_encoder, reference_image)


def encode_reference(reference_encoder: torch.nn.Module, reference_image: torch.Tensor) -> torch.Tensor:
    """The reference encoder's features (B, T_r, W_r) of reference images (B, 3, H, W) in [-1, 1] (fed in [0, 1])."""
    return reference_encoder((reference_image + 1) / 2)
