"""Writes that never leave a half-written file: a temporary name in the target's folder, then one rename.

Single files (JSON, text, tensors, PNGs) go through :func:`atomic_write`; folder-sized outputs
(checkpoints, quantized copies, distillation states) through :func:`atomic_dir`, whose temporary
folder carries the writer's pid so that the next run into the same place removes what a killed run
left. Finished folders get ordinary permissions (the umask's, 0755/0644 by default).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write ``data`` (bytes, UTF-8 text, or a function that writes the file it is given) to ``path``.

    Creates the parent folder; on any failure the temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f".{path.name}.*.tmp"):  # a killed writer's temp file
        pid = old.name[len(path.name) + 2: -4]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            old.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        elif isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            data(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent))


def torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove the ``.OUT.tmp-PID-*`` / ``.OUT.old-PID`` folders beside ``out`` whose process is gone
    (left by a killed run); returns what was removed."""
    removed = []
    for kind in ("tmp", "old"):
        for p in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = p.name[len(f".{out.name}.{kind}-"):].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ordinary_permissions(root: Path) -> None:
    """The umask's modes on a finished folder: mkdtemp makes it 0700, and some writers (safetensors via
    transformers) leave 0600 files."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temp folder beside ``out``; on success it replaces ``out`` in one rename."""
    from .errors import VacError
    from .faults import kill_point

    out = Path(out)
    if out.exists() and not overwrite:
        raise VacError(f"output folder {out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        ordinary_permissions(tmp)
        kill_point("save")
        replace_dir(tmp, out, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path, overwrite: bool = False) -> None:
    """Rename the finished folder ``tmp`` to ``out`` (an existing ``out`` is moved aside first, then
    removed, when ``overwrite``)."""
    from .errors import VacError

    tmp, out = Path(tmp), Path(out)
    if out.exists():
        if not overwrite:
            raise VacError(f"output folder {out} already exists (pass --overwrite to replace it)")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def check_output(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse an output path that is, contains or lies inside an input (a model folder, a file, or
    the local files of a data spec), with a one-line VacError: no command modifies its inputs."""
    from .errors import VacError

    mine = Path(out).resolve()
    for role, given in inputs.items():
        for path in _paths(given):
            theirs = path.resolve()
            if mine == theirs or theirs.is_relative_to(mine) or mine.is_relative_to(theirs):
                raise VacError(f"--out {out} overlaps the {role} {given}; write the output somewhere else")


def _paths(given) -> list[Path]:
    """The local paths an input names: itself, or the file parts of a data spec (``a.txt+b.txt``)."""
    if not given:
        return []
    if Path(given).exists():
        return [Path(given)]
    parts = [p.strip() for p in str(given).split("+")]
    return [Path(p) for p in parts if p and Path(p).exists()]
