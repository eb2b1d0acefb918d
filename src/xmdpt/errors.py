"""Errors that name bad user input.

The CLI turns an `InputError` into one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad user input: a wrong path, a corrupt file, a malformed pose, a folder that is not ours."""
