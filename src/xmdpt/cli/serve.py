"""`xmdpt serve`: the web page (Gradio, the optional extra `xmdpt[app]`), on 127.0.0.1 by default."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from xmdpt.cli.generate import CacheOption, PrecisionOption
from xmdpt.errors import InputError


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the page to the network.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 7860,
    model: Annotated[str | None, typer.Option(help="Pipeline folder or Hub id; default: the embedded model.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda...; default: cuda if present.")] = None,
    dtype: PrecisionOption = None,
    cache: CacheOption = None,
    steps: Annotated[
        int | None, typer.Option(min=1, max=200, help="Initial sampling steps; default: the model's.")
    ] = None,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Largest upload accepted, in MB.")] = 10.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests that may wait; more are turned away.")] = 16,
) -> None:
    """Serve the re-posing page: upload a person, give a pose, generate, download."""
    # Gradio phones home for analytics by default; this server must work offline and tell no one.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise InputError(f"the web page needs Gradio: pip install 'xmdpt[app]' ({err})") from None
    from xmdpt.app import Reposer, launch
    from xmdpt.default_model import load_pipeline

    pipe = load_pipeline(model, device)
    pipe.set_progress_bar_config(disable=False)
    if dtype is not None:
        pipe.set_sampling_defaults(precision=dtype.value)
    if cache is not None:
        pipe.set_sampling_defaults(cache=cache)
    launch(
        Reposer(
            pipe,
            num_inference_steps=steps,
            max_upload_mb=max_upload_mb,
            notice=embedded_model_notice(pipe.image_size) if model is None else None,
        ),
        host=host,
        port=port,
        max_queue=max_queue,
    )


def embedded_model_notice(size: tuple[int, int]) -> str:
    """What the page says when it serves the embedded default model: it cannot re-pose a real photo."""
    height, width = size
    return (
        f"this page serves the embedded demo model. It was trained only on synthetic {height}x{width} figures "
        "(height x width) drawn by xmdpt itself, so it will not re-pose a real photo. For real photos, serve a real "
        'model: `xmdpt serve --model FOLDER` (see the README section "Use a real model").'
    )
