"""vac's cache folder and its keys: dense statistics and perplexities of unchanged model folders.

The root is ``$VAC_HOME`` (default ``~/.cache/vac``); corpora, tokens, the embedded model, statistics
and PPL results live below it. Keys hash a model folder's resolved path, its weight files' names,
sizes and mtimes, and the settings, so a rewritten checkpoint never hits a stale entry; anything that
is not a local folder (a hub id) is not cached. Entries are written atomically; an entry that cannot
be read is reported in one warning line and recomputed.

Dense statistics are cached in parts (:class:`StatisticsCache`), one format for ``vac compress``,
``vac search`` and the benchmarks: the Fisher pass (with the input statistics of its windows), and
input statistics over the first N calibration windows. Files hold plain tensors and numbers only and
are read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from .atomic import torch_save, write_json
from .faults import kill_point


def cache_dir() -> Path:
    """Root of vac's cache: ``$VAC_HOME`` if set, else ``~/.cache/vac``."""
    return Path(os.environ.get("VAC_HOME") or Path.home() / ".cache" / "vac")


def build_lock(name: str):
    """An inter-process lock around the first build of a shared cache entry (the embedded model, a
    corpus): of two vac processes started at once on an empty cache (two commands, or the test suite's
    workers), one builds while the other waits, then reads what was built. ``filelock`` (the lock
    huggingface_hub takes around its downloads; a dependency of torch) rather than a hand-written flock."""
    from filelock import FileLock

    path = cache_dir() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def cache_key(source: str | None, *settings) -> str | None:
    """A disk-cache key for results of an unchanged model folder (None for anything else)."""
    if not source or not Path(source).is_dir():
        return None
    weights = sorted(Path(source).glob("*.safetensors"))
    stamp = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    return hashlib.sha256(json.dumps([str(Path(source).resolve()), stamp, *settings]).encode()).hexdigest()[:24]


def load_entry(path: Path, loader):
    """``loader(path)``, or None when the entry is absent or unreadable (then warned and removed)."""
    if not path.is_file():
        return None
    try:
        return loader(path)
    except Exception as exc:  # truncated, foreign or corrupt file: recompute rather than trust it
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        warn(f"ignoring unreadable cache entry {path} ({first}); recomputing it")
        path.unlink(missing_ok=True)
        return None


def cached_json(path: Path | None, compute):
    """A JSON result cached at ``path`` (None: not cached)."""
    if path is not None:
        hit = load_entry(path, lambda p: json.loads(p.read_text()))
        if isinstance(hit, dict):
            return hit
    result = compute()
    if path is not None:
        write_json(path, result, indent=None)
    return result


# ----------------------------------------------------------------------------- statistics


def pack_inputs(inputs: dict) -> dict:
    """Input statistics as plain tensors; groups that share one object stay shared on unpacking."""
    leaders, members, seen = {}, {}, {}
    for path, s in inputs.items():
        leader = seen.setdefault(id(s), path)
        members[path] = leader
        if leader == path:
            leaders[path] = {"xtx": s.xtx, "abs_sum": s.abs_sum, "tokens": s.tokens, "cross": s.cross}
    return {"leaders": leaders, "members": members}


def unpack_inputs(packed: dict) -> dict:
    from .core.calibrate import InputStats

    leaders = {p: InputStats(d["xtx"], d["abs_sum"], d["tokens"], d["cross"]) for p, d in packed["leaders"].items()}
    return {p: leaders[leader] for p, leader in packed["members"].items()}


def pack_fisher(fisher: dict) -> dict:
    return {p: {"row": f.row, "col": f.col, "windows": f.windows} for p, f in fisher.items()}


def unpack_fisher(packed: dict) -> dict:
    from .core.calibrate import FisherStats

    return {p: FisherStats(d["row"], d["col"], d["windows"]) for p, d in packed.items()}


class StatisticsCache:
    """The parts of the dense statistics of one model folder under one :class:`~vac.config.DataConfig`,
    on disk under ``$VAC_HOME/stats``, keyed by the folder, the calibration tokens and the batch
    (``source=None``: computed every time, nothing written)."""

    def __init__(self, source: str | None, data, windows: torch.Tensor, log=None):
        self.source, self.data, self.device, self.log = source, data, windows.device, log
        # the calibration tokens themselves, so windows given by a caller never hit another's entry
        self.tokens = hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()[:16] if source else None

    def path(self, part: str, windows: int) -> Path | None:
        key = cache_key(self.source, "stats/2", part, windows, self.tokens, self.data.batch_size)
        return cache_dir() / "stats" / f"{part}-{key}.pt" if key else None

    def __call__(self, part: str, windows: int, compute):
        """Part ``fisher`` ((fisher, inputs)) or ``inputs`` (inputs) over the first ``windows`` windows."""
        path = self.path(part, windows)
        packed = load_entry(path, lambda p: torch.load(p, map_location=self.device, weights_only=True)) if path else None
        if packed is not None:
            if self.log:
                self.log(f"dense statistics from {path} ({part}, {windows} windows)")
            if part == "fisher":
                return unpack_fisher(packed["fisher"]), unpack_inputs(packed["inputs"])
            return unpack_inputs(packed["inputs"])
        value = compute()
        if path is not None:
            if part == "fisher":
                torch_save({"fisher": pack_fisher(value[0]), "inputs": pack_inputs(value[1])}, path)
            else:
                torch_save({"inputs": pack_inputs(value)}, path)
        kill_point("statistics")
        return value


def cached_dense_statistics(net, windows: torch.Tensor, cfg, source: str | None, log=None, progress=True):
    """``core.driver.dense_statistics(net, windows, cfg)`` with its parts cached for ``source``."""
    from .core.driver import dense_statistics

    return dense_statistics(net, windows, cfg, progress, cache=StatisticsCache(source, cfg.data, windows, log))
