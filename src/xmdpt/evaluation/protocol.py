"""The field's evaluation protocol: evaluation sizes, resizing and uint8 quantisation (reference section 10).

Order of operations (this is what every metric in `xmdpt.evaluation` assumes):

* **Generated images** leave the model as float tensors in [-1, 1] at the model's resolution (the public X-MDPT
  code works on 256x256, stretched). `model_output_to_uint8` maps them to [0, 1], clamps, resizes **in float** to
  the evaluation size with bicubic, antialiased `torch.nn.functional.interpolate`, then multiplies by 255, clamps
  and quantises to uint8 by **truncation**. This is CFLD's `pose_transfer_test.py` line for line
  (`F.interpolate(..., mode="bicubic", antialias=True)`, `* 255`, `clamp(0, 255)`, `.to(torch.uint8)`). PIDM's
  `utils/gen.py` also truncates (`(255 * x).astype(np.uint8)`), but before any resize (see docs/evaluation.md, "How
  our protocol maps onto PIDM's and CFLD's scripts"). The uint8 images are what the generation loop writes as PNG
  and what every metric scores.
* **Real images** (test targets and the FID training set) are read with PIL, converted to RGB and, if their size is
  not the evaluation size, resized with PIL bicubic (`Image.BICUBIC`, antialiased on downscale) to uint8, as CFLD's
  `transforms.Resize(size, BICUBIC)` on a PIL image does.
* Metrics read uint8 and convert with `uint8_to_unit` (float32, x / 255), the [0, 1] input of CFLD's metric module.

Sizes are (height, width) everywhere in this package.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xmdpt.errors import InputError

#: Written into every statistics file; bump it when anything above changes the numbers.
PROTOCOL_VERSION = "xmdpt-eval-1 (cfld order: float bicubic-aa resize, x255, clamp, truncate to uint8)"

#: The two DeepFashion evaluation sizes of the PIDM/CFLD lineage, (height, width).
EVAL_SIZES: dict[str, tuple[int, int]] = {"256x176": (256, 176), "512x352": (512, 352)}

#: File suffixes that count as images when a folder is checked (anything else in a folder is ignored).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})

Rounding = Literal["floor", "round"]


def parse_size(value: str | tuple[int, int]) -> tuple[int, int]:
    """Parse an evaluation size given as "256x176" (height x width) or a (height, width) pair."""
    if isinstance(value, tuple):
        height, width = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
        if match is None:
            raise InputError(f"evaluation size {value!r} is not HEIGHTxWIDTH, e.g. 256x176")
        height, width = int(match[1]), int(match[2])
    if height <= 0 or width <= 0:
        raise InputError(f"evaluation size {height}x{width} must be positive")
    return int(height), int(width)


def format_size(size: tuple[int, int]) -> str:
    """(256, 176) -> "256x176" (height x width)."""
    return f"{size[0]}x{size[1]}"


def model_output_to_uint8(
    images: torch.Tensor, size: tuple[int, int], *, rounding: Rounding = "floor"
) -> torch.Tensor:
    """Protocol post-processing of generated images.

    Args:
        images: float tensor (B, 3, h, w) in [-1, 1] (the model's output range), any resolution.
        size: evaluation size (height, width), e.g. (256, 176).
        rounding: "floor" truncates like CFLD and PIDM (the default, for comparable numbers); "round" rounds to
            nearest, which is unbiased but differs from the published scripts by up to one grey level.

    Returns:
        uint8 tensor (B, 3, height, width) on the input's device.
    """
    _check_batch(images, "images")
    if not images.is_floating_point():
        raise InputError(f"model_output_to_uint8 expects float images in [-1, 1], got dtype {images.dtype}")
    unit = (images.float() * 0.5 + 0.5).clamp(0.0, 1.0)
    return unit_to_uint8(resize_unit(unit, size), rounding=rounding)


def resize_unit(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize float images in [0, 1] (B, 3, h, w) to `size` with bicubic antialiased interpolation (CFLD).

    The result is not clamped: bicubic overshoots slightly, and the protocol clamps after scaling to 0-255.
    A batch already at `size` is returned unchanged.
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)


def unit_to_uint8(images: torch.Tensor, *, rounding: Rounding = "floor") -> torch.Tensor:
    """Float images on the [0, 1] scale -> uint8: x * 255, clamp to [0, 255], then truncate ("floor") or round."""
    scaled = (images.float() * 255.0).clamp(0.0, 255.0)
    if rounding == "round":
        scaled = scaled.round()
    elif rounding != "floor":
        raise ValueError(f"rounding must be 'floor' or 'round', got {rounding!r}")
    # Casting a non-negative float to uint8 truncates toward zero, which is the lineage's quantisation.
    return scaled.to(torch.uint8)


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 on [0, 1] (x / 255), the input every metric of the lineage scores."""
    if images.dtype != torch.uint8:
        raise InputError(f"expected uint8 images, got dtype {images.dtype}")
    return images.to(torch.float32) / 255.0


def resize_real_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Protocol resize of a real photo: RGB, PIL bicubic to (height, width) unless already that size."""
    image = image.convert("RGB")
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.BICUBIC)
    return image


def load_real_image(path: Path | str, size: tuple[int, int]) -> torch.Tensor:
    """Read a real image (target or FID training image) as uint8 (3, H, W) at the evaluation size."""
    return pil_to_uint8(resize_real_image(read_rgb(path), size))


def load_generated_image(path: Path | str, size: tuple[int, int]) -> torch.Tensor:
    """Read a generated image as uint8 (3, H, W); it must already be at the evaluation size.

    Generated images are never resized here: the generation loop resizes and quantises them with
    `model_output_to_uint8`, and a file of another size means the folder was made under another protocol.
    """
    image = read_rgb(path)
    width, height = image.size
    if (height, width) != tuple(size):
        raise InputError(
            f"generated image {path} is {height}x{width}, expected the evaluation size {format_size(size)}"
        )
    return pil_to_uint8(image)


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor (3, H, W)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def save_png(image: torch.Tensor, path: Path | str) -> None:
    """Write one uint8 (3, H, W) image as a lossless PNG (how generated images are stored)."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise InputError(f"save_png expects a uint8 (3, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
    array = image.detach().cpu().permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path, format="PNG")


def read_rgb(path: Path | str) -> Image.Image:
    """Read an image file fully into memory as RGB; unreadable files raise `InputError` naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise InputError(f"image {path} does not exist") from error
    except (OSError, Image.UnidentifiedImageError) as error:
        raise InputError(f"image {path} cannot be read: {error}") from error


def _check_batch(images: torch.Tensor, what: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"{what} must be a (B, 3, H, W) tensor, got shape {tuple(images.shape)}")
