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


# ----------------------------------------------------------------------------------------- counting


def linear_macs(model) -> int:
    """Multiply-accumulates per token of every weight matrix applied to each token: all nn.Linear
    modules (attention, MLP, the factors of LowRankLinear, the LM head even when tied to the
    embeddings). Embedding lookups, norms and attention scores are not counted."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
    return total


def param_count(model) -> int:
    """Distinct parameters (tied ones once); int8 tensors count their elements."""
    seen, total = set(), 0
    for p in model.parameters():
        key = id(p)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def _rss_bytes() -> int:
    try:
        return _proc_status_kb("VmRSS") * 1024
    except (OSError, KeyError):
        return 0


def _touch(t: torch.Tensor) -> None:
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        for name in t.__tensor_flatten__()[0]:
            _touch(getattr(t, name))
    elif t.numel():
        t.sum()


# ------------------------------------------------------------------------------------------- timing


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _generate(model, ids, n: int):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        use_cache=True, pad_token_id=0, eos_token_id=None,
    )


DECODE_PROMPT = 8  # decode is measured llama-bench style: a short prompt, then tg<decode_tokens>


def bench(
    ckpt_dir,
    baseline: str | None = None,
    int8_dir=None,
    *,
    prompt_len: int = 512,
    decode_tokens: int = 64,
    repeats: int = 3,
    threads: int | None = None,
    load_rss: bool = True,
    log=None,
) -> dict:
    """Dense ``baseline`` vs the vac checkpoint ``ckpt_dir`` (vs its int8 copy ``int8_dir``) in one
    process, fp32 activations, batch 1; see the module docstring for the protocol. Returns one dict
    with ``decode_speedup``, ``prefill_speedup``, ``flops_ratio``, ``threads`` and every raw number."""
    from . import checkpoint
    from .quantize import quiet_torchao
    from .zoo import load_model, resolve_model

    quiet_torchao()
    log = log or (lambda _msg: None)
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "config.json").is_file():
        raise VacError(f"{ckpt_dir} is not a model folder (no config.json)")
    if baseline is None:
        report = ckpt_dir / "report.json"
        if report.is_file():
            baseline = json.loads(report.read_text()).get("model")
        if not baseline:
            raise VacError(f"{ckpt_dir} has no report.json naming its dense model: pass --baseline MODEL")
    if prompt_len < 1 or decode_tokens < 2 or repeats < 1:
        raise VacError("need --prompt-len >= 1, --decode-tokens >= 2 and --repeats >= 1")
    if threads is not None:
        if threads < 1:
            raise VacError("--threads must be >= 1")
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()

    sources = {"dense": resolve_model(baseline), "vac": str(ckpt_dir)}
    if int8_dir is not None:
        sources["int8"] = str(int8_dir)
    models, results = {}, {}
    for name, source in sources.items():
        log(f"loading {name}: {source}")
        before = _rss_bytes()
        if name == "dense":
            model, _ = load_model(baseline)
        else:
            model, _ = checkpoint.load(source, dtype=torch.float32)
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                _touch(t.data if type(t) is nn.Parameter else t)
        folder = Path(source) if Path(source).is_dir() else None
        results[name] = {
            "source": source,
            "params": param_count(model),
            "linear_macs_per_token": linear_macs(model),
            "disk_bytes": weights_bytes(folder) if folder else None,
            "resident_bytes": _rss_bytes() - before,
            "quantized": getattr(model.config, "quantization_config", None) is not None,
        }
        if load_rss and folder is not None:
            log(f"measuring the load of {name} in a fresh process")
            probe = load_peak_rss(folder)
            results[name]["load_peak_rss_increase_bytes"] = probe["increase_bytes"]
            results[name]["load_rss_ratio"] = probe["ratio"]
        models[name] = model
    vocab = min(int(m.config.vocab_size) for m in models.values())
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, prompt_len), generator=gen)
    short = prompt[:, :DECODE_PROMPT]

    names = list(models)
    times = {n: {"prefill": [], "gen1": [], "genN": []} for n in names}
    with torch.inference_mode():
        for rnd in range(repeats + 1):  # round 0 warms up (allocator, kernels, caches)
            order = names[rnd % len(names):] + names[: rnd % len(names)]
            for name in order:
                model = models[name]
                t_pre = _timed(lambda: model(prompt, use_cache=False))
                t_1 = _timed(lambda: _generate(model, short, 1))
                t_n = _timed(lambda: _generate(model, short, decode_tokens))
                if rnd:
                    times[name]["prefill"].append(t_pre)
                    times[name]["gen1"].append(t_1)
                    times[name]["genN"].append(t_n)
            log(f"round {rnd}/{repeats} done" + (" (warm-up)" if rnd == 0 else ""))
    for name in names:
        t = times[name]
        prefill_s = min(t["prefill"])
        decode_s = min(t["genN"]) - min(t["gen1"])  # generate's fixed costs and the prompt cancel out
        results[name].update({
            "prefill_seconds": prefill_s,
            "prefill_tokens_per_s": prompt_len / prefill_s,
            "decode_seconds": decode_s,
            "decode_tokens_per_s": (decode_tokens - 1) / decode_s if decode_s > 0 else float("nan"),
            "raw_seconds": t,
        })
    dense, vac = results["dense"], results["vac"]
    out = {
        "baseline": baseline,
        "checkpoint": str(ckpt_dir),
        "int8": str(int8_dir) if int8_dir is not None else None,
        "threads": threads,
        "dtype": "float32 activations",
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "decode_prompt_len": DECODE_PROMPT,
        "repeats": repeats,
        "prefill_speedup": vac["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
        "decode_speedup": vac["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
        "flops_ratio": dense["linear_macs_per_token"] / vac["linear_macs_per_token"],
        "models": results,
        "process_peak_rss_bytes": peak_rss_bytes(),
        "torch": torch.__version__,
        "protocol": (f"batch 1; prefill = one forward of {prompt_len} tokens, use_cache=False; decode = greedy "
                     f"generate with KV cache after a {DECODE_PROMPT}-token prompt, (tg{decode_tokens} - tg1) "
                     f"time for {decode_tokens - 1} tokens; models alternate, best of {repeats} rounds after "
                     f"one warm-up; {threads} threads"),
    }
    if "int8" in results:
        q = results["int8"]
        out["int8_prefill_speedup"] = q["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"]
        out["int8_decode_speedup"] = q["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
    return out
