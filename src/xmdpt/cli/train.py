"""`xmdpt train`: train any preset on any supported data set, on one CPU or many GPUs (Accelerate)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

log = logging.getLogger(__name__)


def train(
    config: Path | None = typer.Option(None, "--config", "-c", help="A YAML file under configs/."),
    overrides: list[str] | None = typer.Argument(None, help="section.field=value overrides, e.g. optim.lr=3e-4"),
    resume: bool = typer.Option(False, help="Continue from the run folder's latest checkpoint."),
    dry_run: bool = typer.Option(False, help="Print the resolved config and exit."),
) -> None:
    """Train X-MDPT. Many GPUs or nodes: `accelerate launch -m xmdpt train ...` or `torchrun ... -m xmdpt train`."""
    from xmdpt.training.config import load_config

    resolved = load_config(config, overrides or [])
    if dry_run:
        typer.echo(resolved.to_yaml(), nl=False)
        return
    from xmdpt.training.trainer import NonFiniteLoss
    from xmdpt.training.trainer import train as run

    try:
        result = run(resolved, resume=resume)
    except NonFiniteLoss as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(3)
    except OSError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(4)
    if result.interrupted:
        typer.echo(f"interrupted at step {result.step}; checkpoint {result.checkpoint}", err=True)
        sys.exit(130)
    typer.echo(f"done: step {result.step}, checkpoint {result.checkpoint}")
