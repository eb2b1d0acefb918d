"""`xmdpt serve`: the web page (Gradio, the optional extra `xmdpt[app]`), on 127.0.0.1 by default."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from xmdpt.errors import InputError


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the page to the network.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port.")] = 7860,
    model: Annotated[str | None, typer.Option(help="Pipeline folder or Hub id; default: the embedded model.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda...; default: cuda if present.")] = None,
    steps: Annotated[int | None, typer.Option(help="Default sampling steps; default: the model's.")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted, in MB.")] = 10.0,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait; more are turned away.")] = 16,
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

    if not 0 < port < 65536:
        raise InputError(f"--port {port} is not a port number")
    if max_upload_mb <= 0:
        raise InputError("--max-upload-mb must be positive")
    if steps is not None and steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    if max_queue < 1:
        raise InputError(f"--max-queue must be at least 1, got {max_queue}")
    pipe, info = load_pipeline(model, device)
    pipe.set_progress_bar_config(disable=False)
    reposer = Reposer(
        pipe,
        num_inference_steps=info.num_inference_steps if steps is None else steps,
        guidance_scale=info.guidance_scale,
        guidance_interval=info.guidance_interval,
        max_upload_mb=max_upload_mb,
    )
    launch(reposer, host=host, port=port, max_queue=max_queue)
