"""``vac export --onnx``: a vac checkpoint (or its dense model) as one ONNX graph for ONNX Runtime.

The exporter is transformers' own (``transformers.exporters.OnnxExporter``: ``torch.export`` then
``torch.onnx.export`` with dynamo, plus the patches transformers keeps for ONNX). optimum-onnx was
considered too; it has no release for transformers 5. vac adds only what is particular to it:

* **one graph for prefill and decode**: the decode step captured by
  ``transformers.exporters.utils.decompose_prefill_decode(multi_token_decode=True)``, whose query
  length is dynamic, so the same graph fills an empty KV cache from a prompt and extends it by one
  token per step (ONNX holds the weights once, not twice as a prefill + decode pair would);
* **logits of the last position only** (``logits_to_keep=1`` in the traced call): what generation
  reads, and what the PyTorch benchmark's time to first token computes too;
* each ``LowRankLinear`` becomes two ``MatMul`` nodes (``down`` then ``up``): no custom op, any
  ONNX Runtime runs it;
* optional **INT8** (``int8=True``): ``onnxruntime.quantization.quantize_dynamic`` through
  transformers' ``OnnxRuntimeQuantizer``, int8 weights per output channel and activations quantized
  at run time, on the ``MatMul`` nodes of the decoder layers' linears (the factors of a vac model,
  the dense linears of a dense one: the same rule for both); the LM head stays fp32.

The folder holds ``model.onnx`` + ``model.onnx.data`` (the weights, external data), ``config.json``,
``generation_config.json``, the tokenizer, ``vac_onnx.json`` (what :mod:`vac.deploy.onnx_runtime`
needs: input/output names, cache shapes, the source) and a short ``README.md``.

Memory: the export holds the model in fp32 and the ONNX IR of its weights (which shares the tensors
until it is saved), so the peak is about twice the fp32 weights: ~1.1 GB for the 135M default, and
for a 7B model ~60 GB: an export of that size is a job for a big-memory host, not for the 24 GB GPU
box the compression itself fits on.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import io
import json
import logging
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_dir, check_output
from ..errors import VacError

MANIFEST = "vac_onnx.json"
GRAPH = "model.onnx"
# the output embeddings, as the exporter's name scopes spell them
_LM_HEAD = re.compile(r"(^|\.)lm_head(\.|$)")


@dataclass
class OnnxExportConfig:
    """How ``vac export --onnx`` writes the graph."""

    int8: bool = False
    """INT8 weights (per output channel, activations quantized at run time) on the decoder's linears"""
    fusions: bool = True
    """fuse norms, rotary embeddings and attention into ONNX Runtime's CPU kernels (transformers'
    ``ort_fusions="cpu"``); the fused graph runs on ONNX Runtime only"""
    opset: int | None = None
    """ONNX opset [default: the newest onnxscript supports]"""
    sample_len: int = 8
    """length of the prompt traced through generate() to capture the decode step (any short length)"""


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise VacError(f"ONNX export needs onnx, onnxscript and onnxruntime (pip install 'vac[onnx]'): {exc}") from None


def _load_source(source: str):
    """(model, tokenizer, kind) for a vac checkpoint folder, a dense model folder, an embedded name
    or a hub id."""
    from ..checkpoint import rank_map
    from ..models.zoo import load_model, resolve_model

    resolved = Path(resolve_model(source))  # a one-line error for a missing folder
    if resolved.is_dir() and not (resolved / "config.json").is_file():
        raise VacError(f"{source} is not a model folder (no config.json)")
    model, tokenizer = load_model(source, dtype=torch.float32)
    if getattr(model.config, "quantization_config", None) is not None:
        raise VacError(f"{source} is an int8 (torchao) checkpoint: export its fp32 source with --int8 instead")
    kind = "vac" if rank_map(model) else "dense"
    return model.eval(), tokenizer, kind


def _decode_step(model, sample_len: int):
    """The model and the kwargs of a multi-token decode call, captured from a real ``generate``."""
    from transformers.exporters.utils import decompose_prefill_decode

    vocab = int(model.config.vocab_size)
    ids = torch.randint(3, max(4, vocab), (1, sample_len), generator=torch.Generator().manual_seed(0))
    generation = copy.deepcopy(model.generation_config)
    generation.do_sample, generation.eos_token_id, generation.pad_token_id = False, None, 0
    for name in ("temperature", "top_p", "top_k"):  # unset: greedy capture, no warnings
        setattr(generation, name, None)
    with torch.no_grad():
        stages = decompose_prefill_decode(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                          generation_config=generation, multi_token_decode=True)
    submodel, inputs = stages["decode"]
    inputs = dict(inputs)
    inputs.pop("attention_mask", None)  # batch 1, no padding: positions and the causal mask suffice
    inputs["logits_to_keep"] = 1
    return submodel, inputs


def decoder_matmuls(onnx_model) -> list[str]:
    """Names of the ``MatMul`` nodes that multiply by a weight of the decoder layers (dense linears,
    factors, and the products ONNX Runtime's fusions pack from several of them), i.e. every MatMul
    with a constant weight except the LM head's, which the exporter's name scopes mark."""
    weights = set(onnx_model.graph.initializers)
    names = []
    for node in onnx_model.graph:
        if node.op_type != "MatMul" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        if node.inputs[1].name not in weights:
            continue  # attention products (activations on both sides)
        try:  # a list literal, outermost first, ending with the aten op: ['', 'model', ..., 'linear']
            scopes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
        except (SyntaxError, ValueError):
            scopes = []
        if not any(_LM_HEAD.search(scope) for scope in scopes):
            names.append(node.name)
    return names


def quantize_int8(program, inputs):
    """``program`` with int8 (7-bit range) weights on its decoder-layer MatMuls (``quantize_dynamic``,
    per output channel) and the number of MatMuls quantized. The nodes are chosen on the exported graph, so
    the quantizer runs after the export rather than inside it."""
    from onnxruntime.quantization import QuantType
    from transformers.exporters import ExportFormat, OnnxRuntimeDynamicConfig, OnnxRuntimeQuantizer

    nodes = decoder_matmuls(program)
    if not nodes:
        raise VacError("found no decoder-layer MatMul nodes to quantize in the exported graph")
    # reduce_range: 7-bit weights. On x86 CPUs without VNNI, ONNX Runtime multiplies u8 activations by s8
    # weights with vpmaddubsw, whose int16 pair sums saturate with 8-bit weights (ONNX Runtime's
    # quantization guide); a graph is exported once and run on whatever CPU its users have
    ort = OnnxRuntimeDynamicConfig(nodes_to_quantize=nodes, per_channel=True, reduce_range=True,
                                   weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    return OnnxRuntimeQuantizer(ort).quantize(program, inputs, ExportFormat.ONNX), len(nodes)


@contextmanager
def _quiet():
    """torch.export/torch.onnx report every step on stdout and every specialized dimension as a
    warning: keep them out of vac's output (stdout may be ``--json``)."""
    loggers = [logging.getLogger(n) for n in ("torch._export", "torch.export", "torch.onnx", "torch.utils._pytree",
                                              "torch.fx.experimental.symbolic_shapes", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _cache_layout(session_inputs) -> dict:
    """Cache input names and their [batch, kv_heads, time, head_dim] shapes, from the graph."""
    def dim(d):  # the exporter may name fixed sizes as strings ('2'); the time axis is symbolic ('s53')
        return d if isinstance(d, int) else int(d) if isinstance(d, str) and d.isdigit() else None

    names = [i.name for i in session_inputs if i.name.startswith("input.cache.")]
    shapes = {i.name: [dim(d) for d in i.shape] for i in session_inputs if i.name in names}
    return {"inputs": names, "shapes": shapes, "time_axis": 2}


def export_onnx(source, out, config: OnnxExportConfig | None = None, *, overwrite: bool = False,
                command: str | None = None, log=None) -> dict:
    """Export ``source`` (vac checkpoint folder, dense model folder or embedded name) to the ONNX
    folder ``out``, atomically; returns the summary also written to ``out/vac_onnx.json``."""
    _require_onnx()
    import onnxruntime as ort
    from transformers.exporters import OnnxConfig, OnnxExporter

    from .bench import head_macs, linear_macs, param_count

    config = config or OnnxExportConfig()
    log = log or (lambda _msg: None)
    out = Path(out)
    if out.exists() and not overwrite:
        raise VacError(f"output folder {out} already exists (pass --overwrite to replace it)")
    if config.sample_len < 2:
        raise VacError("sample_len must be at least 2")
    check_output(out, {"source model": source})  # names that are not local paths are skipped
    model, tokenizer, kind = _load_source(str(source))
    started = time.perf_counter()
    submodel, inputs = _decode_step(model, config.sample_len)
    log(f"exporting the {kind} model {source} to ONNX")
    with _quiet():
        program = OnnxExporter().export(submodel, inputs, OnnxConfig(
            dynamic=True, opset_version=config.opset, ort_fusions="cpu" if config.fusions else None)).program
        quantized = 0
        if config.int8:
            log("int8 on the decoder's MatMuls (onnxruntime.quantization.quantize_dynamic)")
            program, quantized = quantize_int8(program, inputs)
    seconds = time.perf_counter() - started
    with atomic_dir(out, overwrite) as tmp:
        OnnxExporter.save_program(program, tmp / GRAPH)
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        session = ort.InferenceSession(str(tmp / GRAPH), providers=["CPUExecutionProvider"])
        summary = {
            "format": "vac-onnx/1",
            "source": str(source),
            "kind": kind,
            "model_type": model.config.model_type,
            "int8": config.int8,
            "config": dataclasses.asdict(config),
            "int8_matmuls": quantized,
            "graph": GRAPH,
            "inputs": [i.name for i in session.get_inputs()],
            "outputs": [o.name for o in session.get_outputs()],
            "cache": _cache_layout(session.get_inputs()),
            "logits": "last position only (logits_to_keep=1)",
            "max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
            "params": param_count(model),
            "linear_macs_per_token": linear_macs(model),
            "head_macs": head_macs(model),
            "export_seconds": seconds,
            "weights_bytes": sum(f.stat().st_size for f in tmp.glob("model.onnx*")),
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
        }
        if command:
            summary["command"] = command
        del session
        (tmp / MANIFEST).write_text(json.dumps(summary, indent=1))
        (tmp / "README.md").write_text(_readme(summary, out))
    return summary


def _readme(summary: dict, folder: Path) -> str:
    return f"""# ONNX export of {summary['source']}

Written by `vac export --onnx` ({summary['kind']} model{', int8 decoder MatMuls' if summary['int8'] else ''}).
One graph serves prefill and decode: `input_ids` and `position_ids` ([1, n]) plus the KV cache of every
layer (`input.cache.layers.N.keys/values`, [1, kv_heads, past, head_dim]; zero-length for a fresh prompt);
it returns the logits of the last position and the extended cache (`output.cache.layers.N.*`).

```python
from vac.deploy.onnx_runtime import OnnxCausalLM
model = OnnxCausalLM("{folder}")
model.generate(input_ids, max_new_tokens=64)       # greedy; do_sample=True, temperature=, top_p= to sample
```
or `vac chat {folder} --runtime onnx`; `vac bench CHECKPOINT --runtime onnx` times it against the dense model. The tokenizer and configs beside the graph are the model's own.
"""
