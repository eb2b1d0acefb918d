"""Latent codecs: images (B, 3, H, W) in [-1, 1] <-> latents (B, C, H / f, W / f).

- `VAECodec`: diffusers `AutoencoderKL` (the published `stabilityai/sd-vae-ft-mse`), latents scaled by 0.18215.
- `PixelCodec`: lossless pixel-unshuffle, for small pixel-space models that need no pretrained weights.

Both are `ModelMixin`s with `encode(images, sample=False, generator=None)`, `decode(latents)`, `latent_channels` and
`downsample_factor`, so the pipeline and the training loop treat them alike.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from xmdpt.errors import InputError


class VAECodec(ModelMixin, ConfigMixin):
    """A frozen KL autoencoder. `sample=False` encodes to the posterior mean (deterministic, used for the
    reference image); `sample=True` draws from the posterior (the public training code does)."""

    @register_to_config
    def __init__(self, vae_config: dict | None = None, scaling_factor: float = 0.18215):
        super().__init__()
        self.vae = AutoencoderKL(**(vae_config or {}))
        self.vae.requires_grad_(False)
        self.vae.eval()

    @classmethod
    def from_vae(cls, name_or_path: str | Path, scaling_factor: float = 0.18215) -> VAECodec:
        """Wrap pretrained weights: a Hub id such as `stabilityai/sd-vae-ft-mse`, or a local folder."""
        try:
            vae = AutoencoderKL.from_pretrained(str(name_or_path))
        except (OSError, ValueError) as err:
            raise InputError(f"{name_or_path}: cannot load the VAE ({str(err).splitlines()[0]})") from None
        config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
        codec = cls(vae_config=config, scaling_factor=scaling_factor)
        codec.vae.load_state_dict(vae.state_dict())
        return codec

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def train(self, mode: bool = True) -> VAECodec:
        return super().train(False)

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        posterior = self.vae.encode(images.to(self.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mean
        return latents * self.config.scaling_factor  # (B, C, H / f, W / f)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # differentiable in the latents (a texture loss)
        return self.vae.decode(latents.to(self.dtype) / self.config.scaling_factor).sample  # (B, 3, H, W)


class PixelCodec(ModelMixin, ConfigMixin):
    """Pixel-unshuffle by `factor`: exact and weight-free, so a small model can diffuse in pixel space on a CPU."""

    @register_to_config
    def __init__(self, factor: int = 4, channels: int = 3):
        super().__init__()
        # diffusers reads a module's device and dtype off its first tensor, and `from_pretrained` expects a weights
        # file: this weight-free codec keeps one empty tensor for both.
        self.register_buffer("device_anchor", torch.zeros(0))

    @property
    def latent_channels(self) -> int:
        return self.config.channels * self.config.factor**2

    @property
    def downsample_factor(self) -> int:
        return self.config.factor

    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.config.factor)  # (B, 3 f^2, H / f, W / f)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.config.factor)  # (B, 3, H, W)
