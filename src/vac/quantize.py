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
import logging
import shutil
from pathlib import Path

from .errors import VacError

SCHEMES = ("weight-only", "dynamic")
# files written by save_pretrained / the tokenizer; anything else in a checkpoint (report, plots,
# model card) is carried over to the quantized folder
_REGENERATED = ("config.json", "generation_config.json", "configuration_vac.py", "modeling_vac.py")
_REGEX = r"re:.*\.(down|up)"  # the factor linears of LowRankLinear, as a torchao FqnToConfig key


def quiet_torchao() -> None:
    """torchao's CPU build logs a warning for each CUDA-only extension it cannot load, and torch one for
    each Enum torchao registers with pytree: harmless on CPU, so kept off stderr."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


quiet_torchao()


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
    return quantize_, FqnToConfig, {"weight-only": Int8WeightOnlyConfig, "dynamic": Int8DynamicActivationInt8WeightConfig}


def factor_paths(model) -> list[str]:
    """Module paths of every ``down``/``up`` factor linear in ``model``."""
    from .checkpoint.hf.modeling_vac import LowRankLinear

    return [f"{name}.{part}" for name, module in model.named_modules() if isinstance(module, LowRankLinear)
            for part in ("down", "up")]


def quantize_factors_(model, scheme: str = "weight-only"):
    """Quantize, in place, the factor linears of ``model`` to int8 (``weight-only``: int8 weights,
    activations in the model's dtype; ``dynamic``: activations quantized per token at run time too),
    and attach the ``TorchAoConfig`` that ``save_pretrained`` needs to write them. Returns the model."""
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


def quantize_checkpoint(src_dir, out_dir, scheme: str = "weight-only", overwrite: bool = False) -> dict:
    """Write an int8 copy of the vac checkpoint ``src_dir`` to ``out_dir`` (atomically).

    Returns ``{"scheme", "quantized_linears", "bytes_before", "bytes_after", "size_ratio"}``; sizes are
    those of the weight files. ``report.json`` (if any) is carried over with a ``quantization`` entry.
    """
    from . import checkpoint
    from .bench import weights_bytes

    src, out = Path(src_dir), Path(out_dir)
    if scheme not in SCHEMES:
        raise VacError(f"unknown int8 scheme '{scheme}'; choose one of: {', '.join(SCHEMES)}")
    if src.resolve() == out.resolve():
        raise VacError("the int8 checkpoint must go to another folder than its source")
    if out.exists() and not overwrite:
        raise VacError(f"output folder {out} already exists (pass --overwrite to replace it)")
    model, tokenizer = checkpoint.load(src, dtype=None)
    quantize_factors_(model, scheme)
    summary = {
        "scheme": scheme,
        "method": f"torchao {'Int8WeightOnlyConfig' if scheme == 'weight-only' else 'Int8DynamicActivationInt8WeightConfig'}"
                  " on LowRankLinear down/up, per-row scales",
        "quantized_linears": len(factor_paths(model)),
        "source": str(src),
        "bytes_before": weights_bytes(src),
    }
    with checkpoint.atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in src.iterdir():
            if f.is_file() and not (tmp / f.name).exists() and f.name not in _REGENERATED \
                    and not f.name.endswith((".safetensors", ".bin")) and f.name != "model.safetensors.index.json":
                shutil.copy2(f, tmp / f.name)
        summary["bytes_after"] = weights_bytes(tmp)
        summary["size_ratio"] = summary["bytes_before"] / summary["bytes_after"]
        report = tmp / "report.json"
        if report.is_file():
            data = json.loads(report.read_text())
            data["quantization"] = summary
            report.write_text(json.dumps(data, indent=2))
    return summary
