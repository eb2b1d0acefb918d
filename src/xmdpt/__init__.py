"""xmdpt: pose-guided person image synthesis with cross-view masked diffusion transformers (X-MDPT).

The names below load on first use, so that `import xmdpt` (and `xmdpt --help`) does not import torch and diffusers.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "XMDPT": "xmdpt.models.xmdpt",
    "XMDPT_PRESETS": "xmdpt.models.xmdpt",
    "xmdpt_from_preset": "xmdpt.models.xmdpt",
    "DinoV2Encoder": "xmdpt.conditioning",
    "LearnedImageEncoder": "xmdpt.conditioning",
    "PixelCodec": "xmdpt.conditioning",
    "VAECodec": "xmdpt.conditioning",
    "XMDPTLoss": "xmdpt.diffusion",
    "make_train_scheduler": "xmdpt.diffusion",
    "XMDPTPipeline": "xmdpt.pipeline",
    "make_sampling_scheduler": "xmdpt.pipeline",
    "load_pipeline": "xmdpt.default_model",
    "example_pose": "xmdpt.examples",
    "example_pose_names": "xmdpt.examples",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'xmdpt' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
