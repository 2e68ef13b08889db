"""Speed and memory of a dense model against its vac checkpoint (and its INT8 variant), in one process.

Protocol (what ``vac bench`` prints beside its numbers):

* **prefill**: one forward of ``prompt_len`` tokens (batch 1, ``use_cache=False``); tokens/s.
* **decode**: greedy ``generate`` from a ``prompt_len``-token prompt with the KV cache, forced to
  ``decode_tokens`` new tokens (``min_new_tokens = max_new_tokens``); new tokens/s, the prefill of the
  prompt subtracted (measured separately with the cache on).
* the models run in turn (dense, factorized, int8, dense, ...), ``repeats`` rounds after one warm-up;
  the best round of each counts, so that noise from other processes on the machine hurts every model
  alike and is filtered out.
* **flops_ratio**: per-token multiply-accumulates of the weight matrices (every linear, LM head
  included; embeddings lookups and attention scores excluded) of the dense model / the factorized one.
* **size on disk**: bytes of the weight files (``*.safetensors``/``*.bin``) of each folder.
* **peak RSS**: the whole process (it holds every model under test) and, in a fresh subprocess per
  folder, the RSS increase caused by loading it (:func:`load_peak_rss`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .errors import VacError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_bytes(path) -> int:
    """Size on disk of the weight files of a model folder."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_bytes() -> int:
    """High-water RSS of this process. ``VmHWM`` rather than ``ru_maxrss``: after a fork+exec the
    latter starts from the *parent's* RSS, which would hide a subprocess's own peak."""
    try:
        return _proc_status_kb("VmHWM") * 1024
    except (OSError, KeyError):  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_LOAD_PROBE = r"""
import collections, gc, json, logging, os, sys, time
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
path = os.path.realpath(sys.argv[1])

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

def smaps():  # resident bytes per mapping kind: the checkpoint's files, other files (code), anonymous
    rss, name = collections.Counter(), None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and "-" in parts[0] and ":" in parts[3]:
                file = parts[5] if len(parts) > 5 else ""
                name = ("checkpoint" if file.startswith(path + "/") else
                        "other_files" if file.startswith("/") else "anonymous")
            elif parts and parts[0] == "Rss:":
                rss[name] += int(parts[1]) * 1024
    return rss

import torch, transformers, transformers.modeling_utils
try:  # transformers imports torchao (when installed) as it builds a model: not a cost of loading
    import torchao, torchao.prototype.safetensors.safetensors_support
    import transformers.integrations.torchao, transformers.quantizers.quantizer_torchao
except ImportError:
    pass
from vac import checkpoint
with torch.no_grad():  # page in the code of the ops used below, so it does not count as loading
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
        torch.ones(64, dtype=dtype).float().sum()
gc.collect()
baseline, maps_before = status("VmRSS"), smaps()
try:  # reset the high-water mark to the current RSS, so import transients do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
before_hwm = status("VmHWM")
started = time.perf_counter()
model, _ = checkpoint.load(path, dtype=None)
seconds = time.perf_counter() - started
loaded_peak = status("VmHWM")

def touch(t):  # read a tensor once (the inner tensors of torchao's subclasses too)
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        for name in t.__tensor_flatten__()[0]:
            touch(getattr(t, name))
    elif t.numel():
        t.sum()

with torch.no_grad():  # read every weight once: mmap-backed tensors become resident too
    for t in list(model.parameters()) + list(model.buffers()):
        touch(t.data if type(t) is torch.nn.Parameter else t)
peak, after, maps_after = status("VmHWM"), status("VmRSS"), smaps()
print(json.dumps({"baseline_rss": baseline, "hwm_before": before_hwm, "peak_rss_loaded": loaded_peak,
                  "peak_rss": peak, "rss_after": after, "hwm_reset": reset, "load_seconds": seconds,
                  "growth_by_kind": {k: maps_after[k] - maps_before[k]
                                     for k in ("checkpoint", "anonymous", "other_files")}}))
"""


def load_peak_rss(path, *, timeout: float = 600) -> dict:
    """Peak RSS increase caused by ``vac.checkpoint.load(path)``, measured in a fresh subprocess.

    Torch, transformers, vac (and torchao for quantized folders) are imported first; the RSS after
    those imports is the baseline and the high-water mark is reset there (``/proc/self/clear_refs``),
    so ``increase_bytes = peak - baseline`` is what loading itself costs. Returns the raw numbers,
    the weight files' size and ``ratio = increase / size``.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise VacError(f"{path} is not a model folder (no config.json)")
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_PROBE, str(path)],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise VacError(f"loading {path} in a subprocess failed: {last}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # without a reset, the import transient may sit above the baseline: count from the larger one
    start = result["baseline_rss"] if result["hwm_reset"] else max(result["baseline_rss"], result["hwm_before"])
    size = weights_bytes(path)
    result["increase_bytes"] = max(0, result["peak_rss"] - start)
    result["weights_bytes"] = size
    result["ratio"] = result["increase_bytes"] / size if size else float("nan")
    return result
