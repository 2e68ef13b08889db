"""Where a job is, for its error messages (:func:`stage`), and fault injection for the kill-and-resume tests: ``VAC_KILL_AT=NAME[:N]`` makes the process SIGKILL
itself the N-th time (default first) it passes the point ``NAME``, as ``kill -9`` would at that moment.

Points: ``statistics`` (a dense-statistics part was just cached), ``sequential`` (a layer was just
factorized), ``save`` (a checkpoint folder is complete but not yet renamed into place),
``search-generation`` (a search generation was saved), ``distill-state`` (a distillation state was saved).
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}
_stage: list = ["", None]


def stage(name: str | None = None, needs: int | None = None) -> str:
    """Set (with ``name``, and the bytes the stage ``needs`` when known) or read the stage the running
    job is in, for one-line error messages."""
    if name is not None:
        _stage[:] = [name, needs]
    return _stage[0]


def stage_needs() -> int | None:
    """The bytes the current stage needs (:mod:`vac.core.memory`), None when not estimated."""
    return _stage[1]


def kill_point(name: str) -> None:
    spec = os.environ.get("VAC_KILL_AT")
    if not spec:
        return
    want, _, count = spec.partition(":")
    if want != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
