"""`xmdpt convert`: public X-MDPT checkpoints -> our `save_pretrained` folders."""

from __future__ import annotations

from pathlib import Path

import typer

from xmdpt.errors import InputError


def parse_size(text: str) -> tuple[int, int]:
    """'32x22' -> (32, 22)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"size {text!r} must look like HEIGHTxWIDTH, e.g. 16x11") from None
    if h <= 0 or w <= 0:
        raise InputError(f"size {text!r} must be positive")
    return h, w


def convert(
    checkpoint: Path = typer.Argument(..., help="A public X-MDPT state dict (model*.pt or ema_0.9999_*.pt)."),
    out_dir: Path = typer.Argument(..., help="Folder to write (config.json + safetensors)."),
    grid: str | None = typer.Option(None, help="Token grid HxW; default: square, read off the checkpoint."),
    decode_layers: int = typer.Option(2, help="Blocks after the side-interpolater (the public models use 2)."),
) -> None:
    """Convert a public X-MDPT checkpoint into a folder that `XMDPT.from_pretrained` loads."""
    from xmdpt.models.convert import convert_public_checkpoint

    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    grid_size = parse_size(grid) if grid else None
    try:
        convert_public_checkpoint(checkpoint, out_dir, grid_size, decode_layers)
    except InputError:  # names the checkpoint already (an InputError is a ValueError: prefixing it doubled the path)
        raise
    except ValueError as err:  # options that do not fit the checkpoint's model
        raise InputError(f"{checkpoint}: {err}") from None
