"""Writes that never leave a half-written file: a temporary name in the target's folder, then one rename.

Folder-sized outputs (checkpoints, quantized copies, distillation states) are built in a temporary
folder and renamed by their writers; this module covers single files (JSON, text, tensors, PNGs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write ``data`` (bytes, UTF-8 text, or a function that writes the file it is given) to ``path``.

    Creates the parent folder; on any failure the temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
