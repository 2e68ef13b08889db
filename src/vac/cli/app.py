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


# per command: the options that lower its memory, named in the out-of-memory message
MEMORY_HINTS = {
    "compress": "--calib-windows, --fisher-windows or --seq-len (or --device cpu)",
    "search": "--calib-windows, --fisher-windows, --seq-len, --population or --workers (or use --streamed)",
    "distill": "--batch-size (with --grad-accum), --seq-len or --top-k",
    "eval": "--seq-len", "bench": "--prompt-len", "quantize": "--seq-len",
}


def friendly(fn):
    """One ``error:`` line instead of a traceback: VacError (exit 2), Ctrl-C (exit 130, nothing
    half-written: every output is renamed into place only when complete) and out-of-memory (exit 2,
    naming the options that lower memory)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VacError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted; no partial output was left (rerun the same command to resume)", err=True)
            raise typer.Exit(130) from None
        except MemoryError as exc:  # torch.OutOfMemoryError (CUDA) is a RuntimeError, handled below
            _out_of_memory(fn.__name__, exc)
        except RuntimeError as exc:
            if "out of memory" not in str(exc).lower():
                raise
            _out_of_memory(fn.__name__, exc)

    return wrapper


def _out_of_memory(command: str, exc: BaseException):
    from ..faults import stage, stage_needs

    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    name = command.removesuffix("_cmd").replace("_", "-")
    hint = MEMORY_HINTS.get(name, "the batch or sequence length")
    where = f" during {stage()}" if stage() else ""
    if stage_needs():
        from ..core.memory import human

        where += f", which needs about {human(stage_needs())} at these settings"
    typer.echo(f"error: out of memory in vac {name}{where} ({first}); lower {hint}", err=True)
    raise typer.Exit(2) from None


RUNTIMES = ("torch", "onnx")  # --runtime of vac chat and vac bench


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise VacError(f"unknown --runtime '{runtime}'; choose {' or '.join(RUNTIMES)}")
    return runtime


def command_line() -> str:
    """The command as the user typed it (for reports)."""
    return " ".join(["vac"] + sys.argv[1:])


def log(msg: str) -> None:
    err.print(msg, highlight=False)
