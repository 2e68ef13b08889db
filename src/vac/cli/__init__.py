"""The ``vac`` command line: a typer app, one module per command group, options from the configs."""

from . import compress, deploy, distill, export, search, use  # noqa: F401  (each registers its commands)
from .app import app


def main():
    app()


__all__ = ["app", "main"]
