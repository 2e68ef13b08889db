"""CLI options declared once: from the fields of the config dataclasses and their help metadata.

``@config_options("strategy", StrategyConfig)`` adds one ``--option`` per field of the dataclass to
the command's signature (typer reads ``__signature__``), and calls the command with the built config
in the parameter ``strategy`` instead. A field's metadata may carry ``cli=False`` (not an option),
``flag`` (a ``--x/--no-x`` pair) and ``cli_type`` (how it is typed on the command line).
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import MISSING, fields
from typing import Optional

import typer

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def _cli_type(f):
    hinted = f.metadata.get("cli_type")
    if hinted is not None:
        return hinted
    text = str(f.type)
    base = _SCALARS[text.split("|")[0].strip()]
    return Optional[base] if "None" in text else base


def registry(name: str) -> dict:
    """The registry a field's ``choices`` metadata names."""
    from ..config import REFINE_TARGETS
    from ..core.allocate import ALLOCATIONS
    from ..core.methods import METHODS
    from ..core.orders import ORDERS

    return {"methods": METHODS, "allocations": ALLOCATIONS, "orders": ORDERS,
            "refine targets": dict.fromkeys(REFINE_TARGETS)}[name]


def help_text(f) -> str:
    text = f.metadata.get("help", "")
    if "choices" in f.metadata:
        text += f" (one of: {', '.join(registry(f.metadata['choices']))})"
    return text


def option_fields(cls, exclude=()) -> list:
    return [f for f in fields(cls) if f.metadata.get("cli", True) and f.name not in exclude]


def config_options(param: str, cls, *, exclude=(), defaults: dict | None = None):
    """Decorator: the fields of ``cls`` become options; the command gets ``param=cls(**values)``.
    ``defaults`` overrides a field's default for this command only (e.g. a longer window)."""
    chosen = option_fields(cls, exclude)
    defaults = defaults or {}

    def deco(fn):
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
                  if p.name != param]
        names = {p.name for p in params}
        for f in chosen:
            if f.name in names:
                raise TypeError(f"{fn.__name__}: option {f.name} is declared twice")
            default = defaults.get(f.name, f.default if f.default is not MISSING else None)
            decls = [f.metadata["flag"]] if "flag" in f.metadata else []
            option = typer.Option(default, *decls, help=help_text(f))
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=_cli_type(f)))

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = {f.name: kwargs.pop(f.name) for f in chosen if f.name in kwargs}
            kwargs[param] = cls(**values)
            return fn(*args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must read the new signature, not the original's
        return wrapper

    return deco
