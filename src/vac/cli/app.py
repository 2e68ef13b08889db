"""The typer app every command registers on, its consoles and the one-line error handling."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

from ..errors import VacError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="vac: structural low-rank compression of HuggingFace causal LMs.")
out = Console()
err = Console(stderr=True)


def friendly(fn):
    """Turn VacError (and data errors) into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VacError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def command_line() -> str:
    """The command as the user typed it (for reports)."""
    return " ".join(["vac"] + sys.argv[1:])


def log(msg: str) -> None:
    err.print(msg, highlight=False)
