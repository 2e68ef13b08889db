"""Calibration hidden states on disk instead of in memory (``vac compress --offload-dir DIR``).

The streamed passes keep the hidden states of every calibration batch at the current layer boundary
(the Fisher pass: at every boundary). For long calibration sets that is the largest term of the peak
(64 × 2048 tokens at hidden 4096: 2.1 GB per boundary). With an offload folder each batch's hidden
state is one safetensors file, written as the batch leaves a layer and read back when the next layer
needs it: one batch in memory at a time, same numbers (the files hold the exact tensors).

accelerate's disk offload (``offload_folder``) moves *weights*, not activations, so this is ours.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..errors import VacError

_ids = itertools.count()


class Spilled(Sequence):
    """A list of tensors kept as files in ``folder``; an item is read (onto ``device``) when used.
    The files are deleted when the object is (the passes drop a boundary once the next is complete)."""

    def __init__(self, folder: Path, items: Iterable[torch.Tensor], device):
        from safetensors.torch import save_file

        self.folder, self.device = folder / f"boundary-{next(_ids)}", device
        self.folder.mkdir(parents=True)
        self.n = 0
        for t in items:
            save_file({"h": t.detach().contiguous().cpu()}, str(self._file(self.n)))
            self.n += 1

    def _file(self, j: int) -> Path:
        return self.folder / f"{j:06d}.safetensors"

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int):
        from safetensors.torch import load_file

        if not -self.n <= j < self.n:
            raise IndexError(j)
        return load_file(self._file(j % self.n))["h"].to(self.device)

    def __del__(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def offload_folder(offload_dir: str | os.PathLike) -> Path:
    """``offload_dir`` as a Path, refused (one line) when it is a file."""
    base = Path(offload_dir)
    if base.exists() and not base.is_dir():
        raise VacError(f"--offload-dir {base} is a file, not a folder")
    return base


class Keeper:
    """``keep(items)``: the hidden states of one boundary as a list (no offload folder) or
    :class:`Spilled` in a private folder under ``offload_dir`` (removed by :meth:`close`)."""

    def __init__(self, offload_dir: str | os.PathLike | None, device):
        self.device, self.folder = device, None
        if offload_dir is not None:
            base = offload_folder(offload_dir)
            base.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="vac-activations-", dir=base))

    def __call__(self, items: Iterable[torch.Tensor]) -> list | Spilled:
        return list(items) if self.folder is None else Spilled(self.folder, items, self.device)

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
