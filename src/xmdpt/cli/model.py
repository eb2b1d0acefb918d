"""`xmdpt convert`: public X-MDPT checkpoints -> our `save_pretrained` folders."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from xmdpt.errors import InputError
from xmdpt.settings import PUBLISHED_POSE_ENCODER, PUBLISHED_REFERENCE_ENCODER, PUBLISHED_VAE, SAMPLING_PRESETS

SamplingPreset = Enum("SamplingPreset", {name: name for name in SAMPLING_PRESETS}, type=str)


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
    out_dir: Path = typer.Argument(..., help="The pipeline folder to write."),
    vae: str = typer.Option(PUBLISHED_VAE, help="The SD-VAE: a Hub id or a local folder."),
    pose_encoder: str = typer.Option(PUBLISHED_POSE_ENCODER, help="DINOv2-B: a Hub id or a local folder."),
    reference_encoder: str = typer.Option(PUBLISHED_REFERENCE_ENCODER, help="DINOv2-g: a Hub id or a local folder."),
    grid: str | None = typer.Option(None, help="Token grid HxW; default: square, read off the checkpoint."),
    decode_layers: int = typer.Option(2, help="Blocks after the side-interpolater (the public models use 2)."),
    denoiser_only: bool = typer.Option(False, help="Write the denoiser alone (config.json + safetensors)."),
    sampling: SamplingPreset = typer.Option(
        "published",
        help="The folder's sampling defaults: published (DDIM 50, guidance 2 at every step, as the paper) or fast "
        "(DPM-Solver++ 20, guidance on [200, 800], FORA).",
    ),
) -> None:
    """Convert a public X-MDPT checkpoint into a pipeline folder that `--model` and `load_pipeline` take: the
    denoiser, the SD-VAE, both DINOv2 encoders and sampling defaults (the published ones unless --sampling fast)."""
    from xmdpt.models.convert import convert_public_checkpoint, convert_public_pipeline

    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "model_index.json").is_file():
        raise InputError(f"{out_dir}: a folder with other files in it; give a new or empty folder")
    grid_size = parse_size(grid) if grid else None
    try:
        if denoiser_only:
            convert_public_checkpoint(checkpoint, out_dir, grid_size, decode_layers)
        else:
            pipe = convert_public_pipeline(
                checkpoint, out_dir, vae, pose_encoder, reference_encoder, grid_size, decode_layers, sampling.value
            )
            height, width = pipe.image_size
            typer.echo(f"wrote {out_dir}: a pipeline for {width}x{height} images (use it with --model {out_dir})")
    except InputError:  # names the checkpoint already (an InputError is a ValueError: prefixing it doubled the path)
        raise
    except ValueError as err:  # options that do not fit the checkpoint's model
        raise InputError(f"{checkpoint}: {err}") from None
