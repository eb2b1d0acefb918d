"""Errors that name bad user input.

The CLI turns an `InputError` into one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from pathlib import Path


class InputError(ValueError):
    """Bad user input: a wrong path, a corrupt file, a malformed pose, a folder that is not ours."""


def describe(err: BaseException) -> str:
    """'TypeName: first line' of an exception from a third-party loader, for a one-line message."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def require_file(path: Path, what: str) -> Path:
    """`path` when it is a file; otherwise one line saying that the `what` is missing, or is a folder."""
    if not path.is_file():
        raise InputError(f"{path}: {what} {'is a folder' if path.is_dir() else 'not found'}")
    return path
