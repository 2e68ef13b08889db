"""Disk caches of results that depend only on an unchanged model folder and a few settings.

Keys hash the folder's resolved path, its weight files' names, sizes and mtimes, and the settings, so
a rewritten checkpoint never hits a stale entry; anything that is not a local folder (a hub id) is not
cached. Entries are written to a temporary name and renamed, so an interrupted write leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .atomic import torch_save
from .corpora import cache_dir


def cache_key(source: str, *settings) -> str | None:
    """A disk-cache key for results of an unchanged model folder (None for anything else)."""
    if not Path(source).is_dir():
        return None
    weights = sorted(Path(source).glob("*.safetensors"))
    stamp = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    return hashlib.sha256(json.dumps([str(Path(source).resolve()), stamp, *settings]).encode()).hexdigest()[:24]


def stats_settings(cfg) -> list:
    """What the dense statistics of a compression depend on (besides the model)."""
    return [cfg.calib, cfg.calib_windows, cfg.fisher_windows, cfg.seq_len, cfg.seed, cfg.batch_size,
            cfg.needs_fisher, cfg.needs_inputs, cfg.sequential]


def cached_dense_statistics(net, windows: torch.Tensor, cfg, source: str | None, log=None):
    """``pipeline.dense_statistics(net, windows, cfg)``, loaded from / saved to
    ``$VAC_HOME/stats/compress-KEY.pt`` when ``source`` is a local model folder (``None``: no cache)."""
    from .pipeline import dense_statistics

    key = cache_key(source, *stats_settings(cfg)) if source else None
    path = cache_dir() / "stats" / f"compress-{key}.pt" if key else None
    if path is not None and path.is_file():
        if log:
            log(f"dense statistics from {path}")
        return torch.load(path, map_location=windows.device, weights_only=False)
    stats = dense_statistics(net, windows, cfg)
    if path is not None:
        torch_save(stats, path)
    return stats
