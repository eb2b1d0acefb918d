"""xmdpt: pose-guided person image synthesis with cross-view masked diffusion transformers (X-MDPT)."""

from xmdpt.conditioning import DinoV2Encoder, LearnedImageEncoder, PixelCodec, VAECodec
from xmdpt.diffusion import XMDPTLoss, make_train_scheduler
from xmdpt.models.xmdpt import XMDPT, XMDPT_PRESETS, xmdpt_from_preset
from xmdpt.pipeline import XMDPTPipeline, make_sampling_scheduler

__version__ = "0.1.0"

__all__ = [
    "XMDPT",
    "XMDPT_PRESETS",
    "DinoV2Encoder",
    "LearnedImageEncoder",
    "PixelCodec",
    "VAECodec",
    "XMDPTLoss",
    "XMDPTPipeline",
    "make_sampling_scheduler",
    "make_train_scheduler",
    "xmdpt_from_preset",
]
