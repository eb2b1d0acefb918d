"""`xmdpt evaluate`: the field's evaluation protocol."""


def evaluate() -> None:
    """Not implemented yet."""
    raise NotImplementedError
