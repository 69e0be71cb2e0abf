"""How the command line reports a user's mistake: one red line and exit code 2, no traceback."""

from __future__ import annotations

import contextlib

import typer

from aeflow.errors import AeflowError


@contextlib.contextmanager
def user_errors():
    """An AeflowError is the user's to fix (a bad file, option or run folder): say it plainly and exit 2."""
    try:
        yield
    except AeflowError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
