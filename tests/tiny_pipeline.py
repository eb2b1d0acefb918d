"""A tiny random pixel-space pipeline saved like the embedded default (learned encoders, `PixelCodec`, DDIM)."""

import json
from pathlib import Path

import torch
from conftest import randomize, tiny_model

from xmdpt import LearnedImageEncoder, PixelCodec, XMDPTPipeline, make_sampling_scheduler, make_train_scheduler

SIZE = (32, 24)  # image (height, width); PixelCodec(2) -> 16x12 latents, 8x6 tokens at patch 2
SYNTH = dict(num_identities=20, poses_per_identity=3, size=list(SIZE), seed=3, test_fraction=0.25)


def tiny_pipeline(size: tuple[int, int] = SIZE, sampler: str = "ddim", **model_options) -> XMDPTPipeline:
    height, width = size
    tokens = 1 + -(-height // 8) * -(-width // 8)
    model = tiny_model(
        sample_size=(height // 2, width // 2),
        in_channels=12,
        pose_feature_dim=16,
        pose_num_tokens=tokens,
        reference_feature_dim=16,
        reference_num_tokens=tokens,
        **model_options,
    )
    randomize(model, std=0.05).eval()
    torch.manual_seed(1)  # the encoders' initialisation
    pose_encoder = LearnedImageEncoder(image_size=size, width=16, input_transform="unit")
    reference_encoder = LearnedImageEncoder(image_size=size, width=16, input_transform="signed")
    scheduler = make_sampling_scheduler(sampler, make_train_scheduler("v_prediction").config)
    return XMDPTPipeline(
        model, PixelCodec(factor=2), pose_encoder, reference_encoder, scheduler, precision="fp32"
    )  # exact comparisons, on any CPU


def save_tiny_default(folder: Path, steps: int = 3) -> Path:
    """Write the tiny pipeline plus its `xmdpt_default.json` to `folder`, as the shipped default is laid out."""
    pipe = tiny_pipeline()
    pipe.set_sampling_defaults(num_inference_steps=steps, guidance_scale=1.5)
    pipe.save_pretrained(folder)
    (Path(folder) / "xmdpt_default.json").write_text(json.dumps(SYNTH))
    return Path(folder)
