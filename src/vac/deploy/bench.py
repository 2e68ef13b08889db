"""Speed and memory of a dense model against its vac checkpoint (and its INT8 variant), in one process.

Protocol (what ``vac bench`` prints beside its numbers):

* **prefill**: time to first token of a ``prompt_len``-token prompt: greedy ``generate`` of one new
  token (batch 1), i.e. one forward that fills the KV cache and applies the LM head to the last
  position only (as ``generate``, llama.cpp's ``llama-bench`` pp<N> and serving engines do); tokens/s.
  Its weight-FLOP limit is ``prefill_flops_ratio``: ``prompt_len`` tokens through the decoder's
  linears plus the LM head once, dense / factorized.
* **decode**: greedy ``generate`` with the KV cache after a short prompt (llama-bench's tg<N>), forced
  to ``decode_tokens`` new tokens (``min_new_tokens = max_new_tokens``); tokens/s from
  ``time(N tokens) - time(1 token)``, so generate's fixed costs and the prompt cancel out.
* the vac models get :func:`~vac.decode.fast_decode_` (``up`` factors column-major, direct
  ``F.linear`` calls) unless ``decode_layout=False``; the dense model is run exactly as
  transformers loads it.
* ``use_compile`` (``vac bench --compile``): every model, the dense one too, runs its forward through
  ``torch.compile`` and decodes with a static KV cache; compilation fuses the per-token work outside
  the linears (norms, rotary, attention glue), which eager mode pays alike in both models.
* the models run in turn (dense, factorized, int8, dense, ...), ``repeats`` rounds after one warm-up;
  the best round of each counts, so that noise from other processes on the machine hurts every model
  alike and is filtered out.
* **flops_ratio**: per-token multiply-accumulates of the weight matrices (every linear, LM head
  included; embeddings lookups and attention scores excluded) of the dense model / the factorized one:
  the limit of the decode speed-up.
* **size on disk**: bytes of the weight files (``*.safetensors``/``*.bin``) of each folder.
* **peak RSS**: the whole process (it holds every model under test) and, in a fresh subprocess per
  folder, the RSS increase caused by loading it (:func:`load_peak_rss`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import weights_bytes
from ..core.rss import peak_rss_bytes, rss_bytes
from ..errors import VacError
from .decode import fast_decode_

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
from vac.deploy.compat import fast_int8_loading
fast_int8_loading()  # same memory, linear time for int8 folders
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

    Torch, transformers, vac (and torchao, if installed) are imported first; the RSS after those
    imports is the baseline and the high-water mark is reset there (``/proc/self/clear_refs``), so
    ``increase_bytes = peak - baseline`` is what loading itself costs. After the load every weight is
    read once, so that mmap-backed tensors count as resident. The increase includes the tokenizer
    (``checkpoint.load`` loads it: ~46 MB for SmolLM2's) and a few MB of code paged in on first use;
    ``growth_by_kind`` splits the final RSS growth into pages of the checkpoint's files, anonymous
    memory (copies, the tokenizer, Python objects) and other files (code). Returns the raw numbers,
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


def head_macs(model) -> int:
    """Multiply-accumulates per token of the LM head (the output embeddings, factorized or not)."""
    head = model.get_output_embeddings()
    return linear_macs(head) if head is not None else 0


def prefill_macs(model, tokens: int) -> int:
    """Weight multiply-accumulates of a prefill of ``tokens`` tokens that keeps the last logits only."""
    return prefill_cost(linear_macs(model), head_macs(model), tokens)


def prefill_cost(per_token: int, head: int, tokens: int) -> int:
    """:func:`prefill_macs` from the per-token counts: the decoder on every token, the head once."""
    return (per_token - head) * tokens + head


def param_count(model) -> int:
    """Distinct parameters (tied ones once); int8 tensors count their elements."""
    seen, total = set(), 0
    for p in model.parameters():
        key = id(p)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


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


def greedy_generate(model, ids, n: int, static: bool = False):
    """Exactly ``n`` greedy new tokens after ``ids`` (batch 1, KV cache; ``static``: a static cache)."""
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        use_cache=True, pad_token_id=0, eos_token_id=None, **({"cache_implementation": "static"} if static else {}),
    )


DECODE_PROMPT = 8  # decode is measured llama-bench style: a short prompt, then tg<decode_tokens>


def time_generation(runners: dict, vocab: int, prompt_len: int, decode_tokens: int, repeats: int, log=None) -> dict:
    """Prefill and decode speed of each ``runners[name](ids, n)`` (exactly ``n`` greedy new tokens
    after ``ids``), by the protocol of the module docstring: the runners take turns, ``repeats``
    rounds after a warm-up, best round each. Returns ``{name: {prefill_*, decode_*, raw_seconds}}``."""
    log = log or (lambda _msg: None)
    prompt = torch.randint(3, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    short = prompt[:, :DECODE_PROMPT]
    names = list(runners)
    times = {n: {"prefill": [], "tg1": [], f"tg{decode_tokens}": []} for n in names}
    with torch.inference_mode():
        for rnd in range(repeats + 1):  # round 0 warms up (allocator, kernels, caches)
            order = names[rnd % len(names):] + names[: rnd % len(names)]
            for name in order:
                run = runners[name]
                t_pre = _timed(lambda: run(prompt, 1))
                t_1 = _timed(lambda: run(short, 1))
                t_n = _timed(lambda: run(short, decode_tokens))
                if rnd:
                    for key, value in zip(times[name], (t_pre, t_1, t_n)):
                        times[name][key].append(value)
            log(f"round {rnd}/{repeats} done" + (" (warm-up)" if rnd == 0 else ""))
    results = {}
    for name in names:
        t = times[name]
        prefill_s = min(t["prefill"])
        # generate's fixed costs and the short prompt's prefill cancel out in the difference
        decode_s = min(t[f"tg{decode_tokens}"]) - min(t["tg1"])
        results[name] = {
            "prefill_seconds": prefill_s,
            "prefill_tokens_per_s": prompt_len / prefill_s,
            "decode_seconds": decode_s,
            "decode_tokens_per_s": (decode_tokens - 1) / decode_s if decode_s > 0 else float("nan"),
            "raw_seconds": t,
        }
    return results


def resolve_baseline(ckpt_dir: Path, baseline: str | None) -> str:
    if baseline:
        return baseline
    report = ckpt_dir / "report.json"
    if report.is_file():
        try:
            named = json.loads(report.read_text()).get("model")
        except (ValueError, AttributeError):
            named = None
        if named:
            return named
    raise VacError(f"{ckpt_dir} has no report.json naming its dense model: pass --baseline MODEL")


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
    decode_layout: bool = True,
    compare_stock: bool = False,
    use_compile: bool = False,
    log=None,
) -> dict:
    """Dense ``baseline`` vs the vac checkpoint ``ckpt_dir`` (vs its int8 copy ``int8_dir``) in one
    process, fp32 activations, batch 1; see the module docstring for the protocol.

    ``decode_layout`` applies :func:`fast_decode_` to the vac models (``compare_stock`` also runs the
    checkpoint as loaded, as ``vac-stock``). ``use_compile``: every model's forward goes through
    ``torch.compile`` (inductor, static shapes) and decodes with a static KV cache; the warm-up round
    then pays the compilations (minutes on 2 cores). Returns one dict with ``decode_speedup``,
    ``prefill_speedup``, ``flops_ratio``, ``threads`` and every raw number under ``models``."""
    from .. import checkpoint
    from ..models.zoo import load_model, resolve_model
    from .compat import fast_int8_loading

    fast_int8_loading()
    log = log or (lambda _msg: None)
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "config.json").is_file():
        raise VacError(f"{ckpt_dir} is not a model folder (no config.json)")
    if int8_dir is not None and not (Path(int8_dir) / "config.json").is_file():
        raise VacError(f"{int8_dir} is not a model folder (no config.json)")
    baseline = resolve_baseline(ckpt_dir, baseline)
    if prompt_len < 1 or decode_tokens < 2 or repeats < 1:
        raise VacError("need --prompt-len >= 1, --decode-tokens >= 2 and --repeats >= 1")
    if threads is not None:
        if threads < 1:
            raise VacError("--threads must be >= 1")
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()

    # name -> (source folder or hub id, apply fast_decode_)
    plan = {"dense": (resolve_model(baseline), False), "vac": (str(ckpt_dir), decode_layout)}
    if compare_stock and decode_layout:
        plan["vac-stock"] = (str(ckpt_dir), False)
    if int8_dir is not None:
        plan["int8"] = (str(int8_dir), decode_layout)
    models, results, probes = {}, {}, {}
    for name, (source, fast) in plan.items():
        log(f"loading {name}: {source}")
        before = rss_bytes()
        if name == "dense":
            model, _ = load_model(baseline)
        else:
            model, _ = checkpoint.load(source, dtype=torch.float32)
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                _touch(t.data if type(t) is nn.Parameter else t)
        resident = rss_bytes() - before
        folder = Path(source) if Path(source).is_dir() else None
        results[name] = {
            "source": source,
            "params": param_count(model),
            "linear_macs_per_token": linear_macs(model),
            "prefill_macs": prefill_macs(model, prompt_len),
            "disk_bytes": weights_bytes(folder) if folder else None,
            "resident_bytes": resident,
            "quantized": getattr(model.config, "quantization_config", None) is not None,
            "fast_decode": bool(fast and fast_decode_(model)),
        }
        if use_compile:
            model.forward = torch.compile(model.forward, dynamic=False)
        if load_rss and folder is not None:
            if source not in probes:
                log(f"measuring the load of {name} in a fresh process")
                probes[source] = load_peak_rss(folder)
            results[name]["load_peak_rss_increase_bytes"] = probes[source]["increase_bytes"]
            results[name]["load_rss_ratio"] = probes[source]["ratio"]
        models[name] = model

    vocab = min(int(m.config.vocab_size) for m in models.values())
    runners = {name: (lambda ids, n, m=model: greedy_generate(m, ids, n, use_compile)) for name, model in models.items()}
    for name, timing in time_generation(runners, vocab, prompt_len, decode_tokens, repeats, log).items():
        results[name].update(timing)
    dense = results["dense"]

    def speedups(name: str, prefix: str = "") -> dict:
        r = results[name]
        return {
            f"{prefix}prefill_speedup": r["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
            f"{prefix}decode_speedup": r["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
        }

    out = {
        "baseline": baseline,
        "checkpoint": str(ckpt_dir),
        "int8": str(int8_dir) if int8_dir is not None else None,
        **speedups("vac"),
        "flops_ratio": dense["linear_macs_per_token"] / results["vac"]["linear_macs_per_token"],
        "prefill_flops_ratio": dense["prefill_macs"] / results["vac"]["prefill_macs"],
        "threads": threads,
        "fast_decode": decode_layout,
        "compiled": use_compile,
        "activations": "float32",
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "decode_prompt_len": DECODE_PROMPT,
        "repeats": repeats,
        "models": results,
        "process_peak_rss_bytes": peak_rss_bytes(),
        "torch": torch.__version__,
        "protocol": (f"batch 1, fp32 activations, {threads} threads; prefill = time to first token of a "
                     f"{prompt_len}-token prompt (greedy generate of 1 token: KV cache filled, LM head on the "
                     f"last position); decode = greedy generate with KV cache after a "
                     f"{DECODE_PROMPT}-token prompt, time(tg{decode_tokens}) - time(tg1) for "
                     f"{decode_tokens - 1} tokens; models alternate, best of {repeats} rounds after one "
                     "warm-up" + ("; every model's forward torch.compile'd (inductor, static shapes, static "
                                  "KV cache)" if use_compile else "; eager")),
    }
    if "vac-stock" in results:
        out.update(speedups("vac-stock", "stock_"))
    if "int8" in results:
        out.update(speedups("int8", "int8_"))
    return out
