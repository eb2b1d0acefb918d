"""Shared fixtures: tiny real components (depth 1-2, width 32, latents 8x6), seeded, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from xmdpt.models.xmdpt import XMDPT  # noqa: E402

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# bench/ holds the public code's schedule of work (public_schedule.py), which the equivalence tests compare with.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

TINY = dict(
    sample_size=(8, 6),
    hidden_size=32,
    depth=2,
    num_heads=2,
    decode_layers=1,
    pose_feature_dim=16,
    pose_num_tokens=5,
    reference_feature_dim=24,
    reference_num_tokens=7,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network (CI has none): a connection to anything but this machine, or a torch.hub
    download, fails loudly instead of hanging or passing by luck on a connected machine."""

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in the tests")

    real_connect = socket.socket.connect

    def local_only(self: socket.socket, address, *args):
        # Unix sockets (DataLoader workers) and loopback (the web-page test, torchrun) stay allowed.
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            refuse()
        return real_connect(self, address, *args)

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(socket.socket, "connect", local_only)


def randomize(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Give every weight a random value: a freshly built X-MDPT is zero at its outputs (adaLN-Zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_model(**overrides) -> XMDPT:
    return XMDPT(**{**TINY, **overrides})


def tiny_features(model: XMDPT, batch: int = 3, seed: int = 1) -> tuple:
    """Random `encode_conditions` arguments of the right shapes: pose and reference features, the reference latent
    and, for a model with a pose map, a rendered pose image."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    latent = (batch, cfg.in_channels, *cfg.sample_size)
    pose_image = None
    if cfg.pose_map_channels:
        factor = round((cfg.pose_map_channels // 3) ** 0.5)
        pose_image = torch.rand(batch, 3, cfg.sample_size[0] * factor, cfg.sample_size[1] * factor, generator=g)
    return (
        torch.randn(batch, cfg.pose_num_tokens, cfg.pose_feature_dim, generator=g),
        torch.randn(batch, cfg.reference_num_tokens, cfg.reference_feature_dim, generator=g),
        torch.randn(latent, generator=g),
        pose_image,
    )


def tiny_inputs(model: XMDPT, batch: int = 3, seed: int = 1) -> dict:
    """Random inputs of the right shapes for `model.forward`: sample, timestep and conditions."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed + 1000)
    return dict(
        sample=torch.randn(batch, cfg.in_channels, *cfg.sample_size, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        conditions=model.encode_conditions(*tiny_features(model, batch, seed)),
    )


@pytest.fixture(scope="session")
def tiny_hub(tmp_path_factory):
    """Tiny DINOv2 and VAE folders written with `save_pretrained`, standing in for the Hub's."""
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    dino = Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=28,
            patch_size=14,
        )
    )
    dino.save_pretrained(root / "dinov2")
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=64,
    )
    vae.save_pretrained(root / "vae")
    return root
