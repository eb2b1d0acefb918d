"""Conditioning encoders (images -> token features) and latent codecs (images <-> latents)."""

from xmdpt.conditioning.codecs import PixelCodec, VAECodec
from xmdpt.conditioning.encoders import DinoV2Encoder, LearnedImageEncoder, encode_features, encode_reference

__all__ = ["DinoV2Encoder", "LearnedImageEncoder", "PixelCodec", "VAECodec", "encode_features", "encode_reference"]
