"""Conditioning encoders (DINOv2 through transformers, the learned one) and latent codecs (VAE, pixel)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2Model

from xmdpt.conditioning import DinoV2Encoder, LearnedImageEncoder, PixelCodec, VAECodec
from xmdpt.errors import InputError


def test_dinov2_encoder_returns_cls_and_patches_after_the_final_norm(tiny_hub):
    encoder = DinoV2Encoder.from_dinov2(tiny_hub / "dinov2", image_size=28, input_transform="signed")
    images = torch.rand(2, 3, 64, 44)
    features = encoder(images)
    assert features.shape == (2, encoder.num_tokens, encoder.feature_dim) == (2, 5, 32)
    # The public code's quirks: bicubic resize without antialiasing, [-1, 1] input, no ImageNet normalisation.
    dino = Dinov2Model.from_pretrained(tiny_hub / "dinov2").eval()
    x = F.interpolate(images, size=(28, 28), mode="bicubic", align_corners=False) * 2 - 1
    expected = dino(pixel_values=x).last_hidden_state
    torch.testing.assert_close(features, expected)
    # The final LayerNorm has run: each token is normalised before its affine map.
    ln = dino.layernorm
    normed = (features - ln.bias) / ln.weight
    torch.testing.assert_close(normed.mean(-1), torch.zeros(2, 5), atol=1e-4, rtol=0)


def test_dinov2_input_transforms_differ_and_unit_is_the_pose_quirk(tiny_hub):
    images = torch.rand(1, 3, 28, 28)
    out = {
        mode: DinoV2Encoder.from_dinov2(tiny_hub / "dinov2", image_size=28, input_transform=mode)(images)
        for mode in ("unit", "signed", "imagenet")
    }
    dino = Dinov2Model.from_pretrained(tiny_hub / "dinov2").eval()
    torch.testing.assert_close(out["unit"], dino(pixel_values=images).last_hidden_state)
    assert not torch.allclose(out["unit"], out["signed"]) and not torch.allclose(out["signed"], out["imagenet"])


def test_dinov2_position_table_is_resampled_as_the_hub_model_does(tiny_hub, tmp_path):
    # The tiny DINOv2 has a 2x2 table (28 px, patch 14); at 42 px the input has 3x3 patches, as 224 px has 16x16
    # against the hub models' 37x37.
    encoder = DinoV2Encoder.from_dinov2(tiny_hub / "dinov2", image_size=42, input_transform="unit")
    dino = Dinov2Model.from_pretrained(tiny_hub / "dinov2").eval()
    table = dino.embeddings.position_embeddings  # (1, 5, 32)
    grid = table[:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)

    def resampled(**how):
        out = F.interpolate(grid, mode="bicubic", align_corners=False, **how)
        return torch.cat([table[:, :1], out.permute(0, 2, 3, 1).reshape(1, 9, 32)], dim=1)

    hub, exact = resampled(scale_factor=(3.1 / 2, 3.1 / 2)), resampled(size=(3, 3))
    assert not torch.allclose(hub, exact)  # the two conventions differ, so the test can tell them apart
    torch.testing.assert_close(encoder.dino.embeddings.position_embeddings, hub)
    # The forward uses that table: it equals transformers' model with the hub table put in by hand, not the
    # transformers model resampling its own table.
    images = torch.rand(2, 3, 42, 42)
    plain = dino(pixel_values=images).last_hidden_state
    dino.embeddings.position_embeddings = torch.nn.Parameter(hub)
    dino.config.image_size = 42
    torch.testing.assert_close(encoder(images), dino(pixel_values=images).last_hidden_state)
    assert not torch.allclose(encoder(images), plain)
    # ... and survives save_pretrained (the config records the resampled table's size).
    encoder.save_pretrained(tmp_path)
    torch.testing.assert_close(DinoV2Encoder.from_pretrained(tmp_path)(images), encoder(images))
    # At the table's own size nothing is resampled.
    same = DinoV2Encoder.from_dinov2(tiny_hub / "dinov2", image_size=28, input_transform="unit")
    torch.testing.assert_close(same.dino.embeddings.position_embeddings, table)


def test_dinov2_encoder_is_frozen_and_round_trips(tiny_hub, tmp_path):
    encoder = DinoV2Encoder.from_dinov2(tiny_hub / "dinov2", image_size=28, input_transform="unit")
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    encoder.save_pretrained(tmp_path)
    loaded = DinoV2Encoder.from_pretrained(tmp_path)
    images = torch.rand(1, 3, 40, 30)
    torch.testing.assert_close(loaded(images), encoder(images))
    assert loaded.config.input_transform == "unit"


def test_missing_dinov2_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="cannot load DINOv2"):
        DinoV2Encoder.from_dinov2(tmp_path / "nope")


def test_learned_encoder_shapes_and_gradients():
    encoder = LearnedImageEncoder(image_size=(64, 44), width=32)
    images = torch.rand(2, 3, 256, 176)
    tokens = encoder(images)
    assert tokens.shape == (2, encoder.num_tokens, 32) == (2, 1 + 8 * 6, 32)
    tokens.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())
    # The first token is the mean of the patch tokens, before the norm; different images give different tokens.
    assert not torch.allclose(tokens[0], tokens[1])


def test_learned_encoder_contrast_input_starts_as_the_plain_encoder_and_trains(tmp_path):
    torch.manual_seed(0)
    plain = LearnedImageEncoder(image_size=(32, 24), width=16)
    encoder = LearnedImageEncoder(image_size=(32, 24), width=16, contrast_input=True)
    missing = encoder.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["contrast.bias", "contrast.weight"]
    rows = torch.arange(32)[:, None].expand(32, 24)
    stripes = torch.stack([((rows + shift) % 4 < 2).float().expand(3, 32, 24) for shift in (0, 2)])
    torch.testing.assert_close(encoder(stripes), plain(stripes))  # zero-initialised: the trained function
    encoder(stripes).square().sum().backward()
    assert encoder.contrast.weight.grad.abs().sum() > 0  # ...that the loss can then change
    with torch.no_grad():
        encoder.contrast.weight.normal_()
    assert not torch.allclose(encoder(stripes), plain(stripes))
    # The contrast maps do not see the stripes' phase: with the pixel path silenced, inverted stripes look alike.
    with torch.no_grad():
        encoder.stem[0].weight.zero_()
    features = encoder(stripes)
    torch.testing.assert_close(features[0], features[1])
    assert not torch.allclose(features[0], encoder(torch.zeros(1, 3, 32, 24))[0])  # ...and unlike a plain image
    encoder.save_pretrained(tmp_path)
    loaded = LearnedImageEncoder.from_pretrained(tmp_path)
    assert loaded.config.contrast_input and torch.equal(loaded(stripes), encoder(stripes))


def test_vae_codec_uses_the_posterior_mean_and_the_scaling_factor(tiny_hub):
    codec = VAECodec.from_vae(tiny_hub / "vae")
    assert codec.downsample_factor == 8 and codec.latent_channels == 4
    images = torch.rand(2, 3, 64, 48) * 2 - 1
    latents = codec.encode(images)
    assert latents.shape == (2, 4, 8, 6)
    torch.testing.assert_close(latents, codec.vae.encode(images).latent_dist.mean * 0.18215)
    torch.testing.assert_close(codec.encode(images), latents)  # deterministic
    sampled = codec.encode(images, sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(sampled, latents)
    torch.testing.assert_close(codec.decode(latents), codec.vae.decode(latents / 0.18215).sample)
    # The decoder stays frozen but passes gradients to the latents, for a loss on decoded images (texture_weight).
    latents.requires_grad_(True)
    codec.decode(latents).square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert all(p.grad is None for p in codec.parameters())


def test_vae_codec_round_trips_through_save_pretrained(tiny_hub, tmp_path):
    codec = VAECodec.from_vae(tiny_hub / "vae")
    codec.save_pretrained(tmp_path)
    loaded = VAECodec.from_pretrained(tmp_path)
    images = torch.rand(1, 3, 64, 48) * 2 - 1
    torch.testing.assert_close(loaded.encode(images), codec.encode(images))


def test_pixel_codec_is_lossless():
    codec = PixelCodec(factor=4)
    images = torch.rand(2, 3, 64, 44) * 2 - 1
    latents = codec.encode(images)
    assert latents.shape == (2, 48, 16, 11) and codec.latent_channels == 48 and codec.downsample_factor == 4
    assert torch.equal(codec.decode(latents), images)
