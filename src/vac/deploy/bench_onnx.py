"""``vac bench --runtime onnx``: dense vs vac in ONNX Runtime, and the dense model in eager transformers.

Same protocol as :mod:`vac.deploy.bench` (:func:`~vac.deploy.bench.time_generation`: batch 1, fp32,
prefill = time to first token of a ``prompt_len`` prompt, decode = ``tg<N> - tg1`` after an 8-token
prompt, the models alternating, best of ``repeats`` rounds after a warm-up), with ONNX Runtime and
torch both on ``threads`` intra-op threads. The models:

* ``dense-onnx`` and ``vac-onnx``: the two exports (``vac export --onnx``), made on the fly into
  ``export_dir`` when the folders given are checkpoints (kept there and reused when it is given,
  else a temporary folder); ``vac-int8-onnx`` too with ``int8``;
* ``dense-eager``: the dense model as transformers runs it (what a user of plain transformers
  sees), unless ``eager=False``.

``decode_speedup``/``prefill_speedup`` compare vac-onnx with dense-onnx (the runtime held fixed) and
``vs_eager_*`` with dense-eager; ``flops_ratio``/``prefill_flops_ratio`` are the weight-FLOP limits of
the first pair, from the multiply-accumulates recorded at export.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from ..core.rss import peak_rss_bytes
from ..errors import VacError
from .bench import (
    DECODE_PROMPT,
    greedy_generate,
    prefill_cost,
    resolve_baseline,
    time_generation,
)
from .onnx_export import MANIFEST, OnnxExportConfig, export_onnx
from .onnx_runtime import OnnxCausalLM, is_onnx_folder


def _onnx_folder(given: str, name: str, export_dir: Path, int8: bool, log) -> Path:
    """``given`` itself when it is an ONNX export, else its export into ``export_dir/name`` (reused
    when a finished export of the same source with the same settings is there)."""
    if is_onnx_folder(given):
        return Path(given)
    target, config = export_dir / name, OnnxExportConfig(int8=int8)
    if is_onnx_folder(target):
        made = json.loads((target / MANIFEST).read_text())
        if made.get("source") == str(given) and made.get("config") == dataclasses.asdict(config):
            log(f"reusing the export {target}")
            return target
    log(f"exporting {given} → {target}")
    export_onnx(given, target, config, overwrite=True, log=log)
    return target


def bench_onnx(
    ckpt_dir,
    baseline: str | None = None,
    *,
    int8: bool = False,
    prompt_len: int = 512,
    decode_tokens: int = 64,
    repeats: int = 3,
    threads: int | None = None,
    export_dir=None,
    eager: bool = True,
    log=None,
) -> dict:
    """The ONNX Runtime benchmark of the module docstring. ``ckpt_dir`` is a vac checkpoint or its
    ONNX export; ``baseline`` the dense model (name, folder or its export) [default: the model
    named in the checkpoint's report.json]."""
    log = log or (lambda _msg: None)
    ckpt = Path(ckpt_dir)
    if not (ckpt / "config.json").is_file():
        raise VacError(f"{ckpt} is not a model folder (no config.json)")
    if prompt_len < 1 or decode_tokens < 2 or repeats < 1:
        raise VacError("need --prompt-len >= 1, --decode-tokens >= 2 and --repeats >= 1")
    if threads is not None and threads < 1:
        raise VacError("--threads must be >= 1")
    source = json.loads((ckpt / MANIFEST).read_text())["source"] if is_onnx_folder(ckpt) else str(ckpt)
    if baseline is None:
        if not Path(source).is_dir():
            raise VacError(f"cannot find the checkpoint {source} that {ckpt} was exported from: pass --baseline")
        baseline = resolve_baseline(Path(source), None)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    scratch = None
    if export_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="vac-bench-onnx-")
        export_dir = scratch.name
    export_dir = Path(export_dir)
    try:
        folders = {"dense-onnx": _onnx_folder(baseline, "dense", export_dir, False, log),
                   "vac-onnx": _onnx_folder(str(ckpt), "vac", export_dir, False, log)}
        if int8:
            if is_onnx_folder(ckpt):
                raise VacError("--int8 exports the vac checkpoint again: give the checkpoint folder, not its export")
            folders["vac-int8-onnx"] = _onnx_folder(str(ckpt), "vac-int8", export_dir, True, log)
        results, runners, vocabs = {}, {}, []
        for name, folder in folders.items():
            model = OnnxCausalLM(folder, threads=threads)
            manifest = model.manifest
            if manifest["kind"] != ("dense" if name.startswith("dense") else "vac"):
                raise VacError(f"{folder} holds a {manifest['kind']} model where the {name} model was expected")
            vocabs.append(int(model.config.vocab_size))
            results[name] = {
                "folder": str(folder), "source": manifest["source"], "params": manifest["params"],
                "linear_macs_per_token": manifest["linear_macs_per_token"],
                "prefill_macs": prefill_cost(manifest["linear_macs_per_token"], manifest["head_macs"], prompt_len),
                "onnx_bytes": manifest["weights_bytes"], "int8": manifest["int8"],
            }
            runners[name] = lambda ids, n, m=model: m.generate(ids, max_new_tokens=n, min_new_tokens=n)
        if eager:
            from ..models.zoo import load_model
            from .bench import linear_macs, param_count, prefill_macs

            eager_source = results["dense-onnx"]["source"]  # the dense model the export was made from
            dense, _ = load_model(eager_source)
            results["dense-eager"] = {"source": eager_source, "params": param_count(dense),
                                      "linear_macs_per_token": linear_macs(dense),
                                      "prefill_macs": prefill_macs(dense, prompt_len)}
            runners["dense-eager"] = lambda ids, n, m=dense: greedy_generate(m, ids, n)
        for name, timing in time_generation(runners, min(vocabs), prompt_len, decode_tokens, repeats, log).items():
            results[name].update(timing)
    finally:
        if scratch is not None:
            scratch.cleanup()

    def ratio(a: str, b: str, key: str) -> float:
        return results[a][key] / results[b][key]

    summary = {
        "runtime": "onnxruntime",
        "baseline": baseline,
        "checkpoint": str(ckpt),
        "decode_speedup": ratio("vac-onnx", "dense-onnx", "decode_tokens_per_s"),
        "prefill_speedup": ratio("vac-onnx", "dense-onnx", "prefill_tokens_per_s"),
        "flops_ratio": ratio("dense-onnx", "vac-onnx", "linear_macs_per_token"),
        "prefill_flops_ratio": ratio("dense-onnx", "vac-onnx", "prefill_macs"),
        "threads": threads,
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "decode_prompt_len": DECODE_PROMPT,
        "repeats": repeats,
        "models": results,
        "process_peak_rss_bytes": peak_rss_bytes(),
        "torch": torch.__version__,
        "protocol": (f"batch 1, fp32, {threads} threads (ONNX Runtime intra-op and torch); prefill = time to first "
                     f"token of a {prompt_len}-token prompt (one graph run on an empty cache, last logits); decode = "
                     f"greedy decoding with the KV cache after a {DECODE_PROMPT}-token prompt, time(tg{decode_tokens}) "
                     f"- time(tg1) for {decode_tokens - 1} tokens; models alternate, best of {repeats} rounds after "
                     "one warm-up; dense-eager = transformers generate, eager"),
    }
    summary["decode_efficiency"] = summary["decode_speedup"] / summary["flops_ratio"]
    if eager:
        summary["vs_eager_decode_speedup"] = ratio("vac-onnx", "dense-eager", "decode_tokens_per_s")
        summary["vs_eager_prefill_speedup"] = ratio("vac-onnx", "dense-eager", "prefill_tokens_per_s")
    if int8:
        summary["int8_decode_speedup"] = ratio("vac-int8-onnx", "dense-onnx", "decode_tokens_per_s")
        summary["int8_prefill_speedup"] = ratio("vac-int8-onnx", "dense-onnx", "prefill_tokens_per_s")
    return summary
