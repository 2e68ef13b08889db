"""INT8 on the low-rank factors (torchao), saved so that plain transformers reloads it.

Only the ``down``/``up`` linears of :class:`LowRankLinear` layers are quantized (per-row int8 weights,
one scale per output row); embeddings, norms, the LM head and any linear left dense keep their dtype.

The folder stays a normal vac checkpoint: ``config.json`` gains a ``quantization_config`` of
``quant_method: torchao`` (a ``transformers.TorchAoConfig``), the weights are torchao's flattened
safetensors (``*._weight_qdata`` int8 + ``*._weight_scale``, described in the safetensors metadata), and
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` re-creates the int8 tensors
(torchao must be installed where it is loaded). The shipped modeling code needs no change: the
quantizer swaps the weights of the plain ``nn.Linear`` factors in place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..atomic import atomic_dir, check_output
from ..errors import VacError
from .compat import fast_int8_loading

SCHEMES = ("weight-only", "dynamic")
# files written anew (save_pretrained, the shipped modeling files), or that hold measurements of the source model; anything else
# in a checkpoint (report.json, ranks.png, ...) is carried over to the quantized folder
_NOT_CARRIED = ("config.json", "generation_config.json", "configuration_vac.py", "modeling_vac.py",
                "README.md", "bench.json", "quantize.json", "lm_eval.json")
_REGEX = r"re:.*\.(down|up)"  # the factor linears of LowRankLinear, as a torchao FqnToConfig key


def _torchao():
    try:
        import torchao  # noqa: F401
        from torchao.quantization import (
            FqnToConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError as exc:
        raise VacError(f"INT8 needs torchao (pip install torchao): {exc}") from None
    configs = {"weight-only": Int8WeightOnlyConfig, "dynamic": Int8DynamicActivationInt8WeightConfig}
    return quantize_, FqnToConfig, configs


def factor_paths(model) -> list[str]:
    """Module paths of every ``down``/``up`` factor linear in ``model``."""
    from ..checkpoint.hf.modeling_vac import LowRankLinear

    return [f"{name}.{part}" for name, module in model.named_modules() if isinstance(module, LowRankLinear)
            for part in ("down", "up")]


def quantize_factors_(model, scheme: str = "weight-only"):
    """Quantize, in place, the factor linears of ``model`` to int8 (``weight-only``: int8 weights,
    activations in the model's dtype; ``dynamic``: activations quantized per token at run time too),
    and attach the ``TorchAoConfig`` that ``save_pretrained`` needs to write them. Returns the model.

    Speed on CPU in eager mode (torch 2.13, torchao 0.18, AVX2 without VNNI): weight-only converts
    each int8 weight to the activation dtype on every call, so it saves disk and memory but not
    time; dynamic runs int8 GEMMs that are slower than fp32 on such CPUs (docs/defaults.md)."""
    if scheme not in SCHEMES:
        raise VacError(f"unknown int8 scheme '{scheme}'; choose one of: {', '.join(SCHEMES)}")
    if getattr(model.config, "quantization_config", None) is not None:
        raise VacError("model is already quantized")
    paths = set(factor_paths(model))
    if not paths:
        raise VacError("model has no LowRankLinear factors to quantize (is it a vac checkpoint?)")
    quantize_, FqnToConfig, configs = _torchao()
    from transformers import TorchAoConfig
    from transformers.quantizers import AutoHfQuantizer

    config = configs[scheme]()
    quantize_(model, config, filter_fn=lambda _module, fqn: fqn in paths)
    # a regex instead of ~2 entries per layer keeps config.json short; on reload the quantized tensors
    # are recognized from the safetensors metadata anyway, the regex only matters for re-quantization
    qconfig = TorchAoConfig(FqnToConfig({_REGEX: config}))
    model.config.quantization_config = qconfig
    model.hf_quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=False)
    return model


def quantize_checkpoint(
    src_dir,
    out_dir,
    scheme: str = "weight-only",
    overwrite: bool = False,
    *,
    eval_data: str | None = None,
    eval_windows: int = 40,
    seq_len: int = 512,
    command: str | None = None,
) -> dict:
    """Write an int8 copy of the vac checkpoint ``src_dir`` to ``out_dir`` (atomically).

    Returns the summary that is also written to ``out_dir/quantize.json`` (read by ``vac card``):
    scheme, ``size_before_bytes``/``size_after_bytes`` (weight files) and, with ``eval_data``, the
    perplexity of the source and of the int8 model (``ppl_before``/``ppl_after``, same windows).
    ``report.json`` and other files describing the compression are carried over; files that describe
    the source model's own measurements (``bench.json``, ``quantize.json``, ``lm_eval.json``, the card)
    are not.
    """
    from .. import checkpoint
    from ..checkpoint import weights_bytes

    src, out = Path(src_dir), Path(out_dir)
    if scheme not in SCHEMES:
        raise VacError(f"unknown int8 scheme '{scheme}'; choose one of: {', '.join(SCHEMES)}")
    if out.exists() and not overwrite:
        raise VacError(f"output folder {out} already exists (pass --overwrite to replace it)")
    if not (src / "config.json").is_file():
        raise VacError(f"no checkpoint folder at {src} (no config.json)")
    check_output(out, {"source checkpoint": src, "evaluation data": eval_data})
    fast_int8_loading()
    model, tokenizer = checkpoint.load(src, dtype=None)
    windows = None
    if eval_data:
        if tokenizer is None:
            raise VacError(f"{src} has no tokenizer: cannot measure perplexity (drop --eval)")
        from ..core.evaluate import perplexity
        from ..data.windows import eval_windows as make_windows

        windows = make_windows(tokenizer, eval_data, seq_len, eval_windows)
        before = perplexity(model, windows)
    quantize_factors_(model, scheme)
    config_name = "Int8WeightOnlyConfig" if scheme == "weight-only" else "Int8DynamicActivationInt8WeightConfig"
    summary = {
        "scheme": scheme,
        "method": f"torchao {config_name} on LowRankLinear down/up, per-row scales",
        "quantized_linears": len(factor_paths(model)),
        "source": str(src),
        "size_before_bytes": weights_bytes(src),
    }
    if windows is not None:
        after = perplexity(model, windows)
        summary |= {"ppl_before": before["ppl"], "ppl_after": after["ppl"],
                    "protocol": f"{windows.shape[0]} non-overlapping windows of {seq_len} tokens of {eval_data}, "
                                "all shifted tokens scored, use_cache=False"}
    if command:
        summary["command"] = command
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        checkpoint.write_shipped(tmp, model)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in src.iterdir():
            if f.is_file() and not (tmp / f.name).exists() and f.name not in _NOT_CARRIED \
                    and not f.name.endswith((".safetensors", ".bin", ".safetensors.index.json")):
                shutil.copy2(f, tmp / f.name)
        summary["size_after_bytes"] = weights_bytes(tmp)
        summary["size_ratio"] = summary["size_before_bytes"] / summary["size_after_bytes"]
        (tmp / "quantize.json").write_text(json.dumps(summary, indent=2))
    return summary
