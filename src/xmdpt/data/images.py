"""Safe image loading: every way a user's picture can be odd ends as RGB or as one `InputError` naming the file.

Handled: EXIF orientation (phones store portraits sideways and flag them), grey / palette / alpha / CMYK / 16-bit
modes, truncated or corrupt files, unreadable (permission) files, and decompression bombs or strips (a small file that
claims an enormous canvas, or 20000x1 pixels), which are refused from the header alone before any pixel is decoded.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from xmdpt.errors import InputError, require_file

# The largest photo a current camera writes (50-megapixel phone sensors at full resolution: 8160x6120) fits; it
# decodes into about 200 MB. Beyond is a decompression bomb or a picture to shrink first, and every input path
# (CLI, Python API, web page) decodes the whole picture before bringing it into the model's small frame.
MAX_PIXELS = 50_000_000
# Long side over short side. A standing person is about 2:1 to 3:1, a group shot or panorama crop up to about 6:1;
# beyond 8:1 the picture is a strip, not a person photo, and padding it into a portrait frame multiplies its memory.
MAX_ASPECT = 8
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def check_image_size(
    width: int, height: int, source: str, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT
) -> None:
    """Refuse, naming `source`, a picture size that cannot be a person photo: too many pixels, or too thin."""
    if width < 1 or height < 1:
        raise InputError(f"{source}: image is {width}x{height} pixels, empty")
    if width * height > max_pixels:
        raise InputError(
            f"{source}: image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (a decompression bomb, or a photo to shrink first)"
        )
    long, short = max(width, height), min(width, height)
    if long > max_aspect * short:
        raise InputError(
            f"{source}: image is {width}x{height} pixels, {long / short:,.1f}:1; a person photo lies within "
            f"{max_aspect:g}:1 (crop it to the person first)"
        )


def load_image(
    path: str | Path,
    max_pixels: int = MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
    max_aspect: float = MAX_ASPECT,
):
    """Open `path` as an 8-bit RGB PIL image in display orientation.

    Transparent pixels are composited over `background` (white, like DeepFashion's studio backdrop) rather than
    dropped, because a dropped alpha channel often leaves black or garbage colour behind a cut-out person.
    """
    path = Path(path)
    require_file(path, "image file")
    try:
        with warnings.catch_warnings():
            # PIL warns (rather than raises) between 1x and 2x its limit; our own size check below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                check_image_size(*img.size, str(path), max_pixels, max_aspect)  # from the header, before decoding
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img, background)
    except InputError:
        raise
    except Image.DecompressionBombError as err:  # PIL refuses beyond twice its limit before our check can
        raise InputError(f"{path}: refused as a decompression bomb ({err})") from err
    except UnidentifiedImageError as err:
        raise InputError(f"{path}: not a readable image ({err})") from err
    except PermissionError:
        # An OSError like the decoders' own, but the file is fine: the user lacks the right to read it.
        raise InputError(f"{path}: cannot read the image file: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # Truncated JPEG/PNG data, bad chunks and CRC errors all arrive here from the decoders.
        raise InputError(f"{path}: corrupt or truncated image ({err})") from err


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit and float greys are rescaled, not clipped)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit PNG/TIFF greys: PIL's convert("L") clips at 255, which turns a normal photo white.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV: PIL's own conversions are right for these


def find_image(stem: Path) -> Path | None:
    """The existing file `stem` + one of the usual suffixes (the PIDM layout stores .png for .jpg names)."""
    if stem.suffix.lower() in IMAGE_SUFFIXES and stem.is_file():
        return stem
    base = stem.with_suffix("") if stem.suffix.lower() in IMAGE_SUFFIXES else stem
    for suffix in IMAGE_SUFFIXES:
        for candidate in (base.with_suffix(suffix), base.with_suffix(suffix.upper())):
            if candidate.is_file():
                return candidate
    return None
