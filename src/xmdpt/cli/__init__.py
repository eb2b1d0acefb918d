"""The `xmdpt` command line: thin commands over the library.

Each command group lives in its own module; this one mounts them and turns bad input into one line and exit code 2.
"""

from __future__ import annotations

import logging
import sys

import typer

from xmdpt.cli import data, demo, evaluate, generate, model, pose, serve, train
from xmdpt.errors import InputError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help=__doc__)
app.add_typer(data.app, name="data", help="Prepare DeepFashion and generate the synthetic data set.")
app.command("pose")(pose.pose)
app.command("convert")(model.convert)
app.command("train")(train.train)
app.command("generate")(generate.generate)
app.command("demo")(demo.demo)
app.command("serve")(serve.serve)
app.command("evaluate")(evaluate.evaluate)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script. Usage errors exit with 2 (click's convention), and so does bad input."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Typer vendors click; its usage errors are not exported at the top level.
    from typer._click.exceptions import NoArgsIsHelpError, UsageError

    try:
        # Not standalone: click's own usage errors (a value out of range, an unknown choice) become one line too,
        # instead of a usage banner and a box.
        code = app(args=argv, prog_name="xmdpt", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except NoArgsIsHelpError as err:
        typer.echo(err.ctx.get_help() if err.ctx else str(err))
        sys.exit(2)
    except UsageError as err:
        typer.echo(f"error: {err.format_message()}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except InputError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except OSError as err:  # an unwritable output, a folder where a file goes, a busy port: the user's to fix
        where = f"{err.filename}: " if err.filename else ""
        typer.echo(f"error: {where}{err.strerror or err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
