"""vac: Variable Allocation Compression.

The public API (the CLI and the benchmarks call the same functions)::

    import vac
    model, tokenizer = vac.load("smollm2-135m")           # embedded name, folder or hub id
    config = vac.CompressConfig.of(ratio=1.8)             # strategy + data, every default written once
    result = vac.compress(model, tokenizer, config)       # in place; returns ranks, ratio, timings
    vac.save(model, tokenizer, "runs/smollm2-1.8x")       # loads with plain transformers

``import vac`` registers the vac checkpoint classes with transformers, so ``from_pretrained`` of a
vac folder works without ``trust_remote_code`` in this process. Stage entry points: ``compress_model``
(the whole ``vac compress`` job), ``run_search`` / ``run_ablation`` (with ``SearchSetup``), ``distill``
(with ``DistillConfig``), ``quantize``, ``bench``, ``export_onnx`` (with ``OnnxExportConfig``; run the
folder with ``vac.deploy.onnx_runtime.OnnxCausalLM``).
"""

import logging as _logging

# transformers imports torchao (when installed) whenever it builds a model; torchao's CPU build logs a
# warning for each CUDA-only extension it cannot load, and torch one per Enum torchao registers with
# pytree. Harmless on CPU: kept off stderr.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

from . import checkpoint as _checkpoint  # noqa: E402  (registers the checkpoint classes)
from .config import (  # noqa: E402
    CompressConfig,
    DataConfig,
    EvalConfig,  # noqa: E402
    StrategyConfig,
)
from .core.driver import Result  # noqa: E402
from .core.run import compress_model  # noqa: E402
from .errors import VacError  # noqa: E402
from .models.layers import LowRankLinear, factorize_  # noqa: E402

__all__ = [
    "CompressConfig", "DataConfig", "StrategyConfig", "EvalConfig", "Result", "VacError", "LowRankLinear",
    "load", "save", "compress", "compress_model", "factorize_", "run_search", "run_ablation", "SearchSetup",
    "distill", "DistillConfig", "quantize", "bench", "export_onnx", "OnnxExportConfig",
]

_LAZY = {"SearchSetup": ("vac.search.space", "SearchSetup"), "DistillConfig": ("vac.recover.distill", "DistillConfig"),
         "OnnxExportConfig": ("vac.deploy.onnx_export", "OnnxExportConfig")}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'vac' has no attribute {name!r}")


def load(name_or_dir: str, *, dtype=None, device: str | None = None):
    """``(model, tokenizer)`` of an embedded name, a local folder (dense or vac) or a hub id (fp32 by
    default); a one-line :class:`VacError` on failure."""
    import torch

    from .models.zoo import load_model

    model, tokenizer = load_model(name_or_dir, dtype=dtype or torch.float32)
    return (model.to(device) if device else model), tokenizer


def save(model, tokenizer, out, *, overwrite: bool = False, dtype=None, extra: dict | None = None):
    """Write ``model`` as a vac checkpoint folder (atomically); returns its path."""
    return _checkpoint.save(model, tokenizer, out, overwrite=overwrite, dtype=dtype, extra=extra)


def compress(model, tokenizer, config: CompressConfig | None = None, *, calibration=None,
             source: str | None = None, progress: bool = True) -> Result:
    """Compress ``model`` **in place** under ``config`` and return the :class:`Result` (rank map,
    parameters before/after, ratio, seconds per stage).

    ``calibration``: ``None`` (sample ``config.data.calib``), a data spec string, or a LongTensor of
    token windows ``[n, seq_len]``. ``source``: the model folder, to reuse cached dense statistics."""
    from .core.run import in_memory_compress

    return in_memory_compress(model, tokenizer, config or CompressConfig(), calibration=calibration,
                              source=source, progress=progress)


def run_search(setup, out, **kwargs):
    """Evolutionary strategy search (:func:`vac.search.run.run_search`); ``setup`` a
    :class:`vac.search.space.SearchSetup`."""
    from .search.run import run_search as run

    return run(setup, out, **kwargs)


def run_ablation(setup, out, **kwargs):
    """The default with one setting changed at a time (:func:`vac.search.ablation.run_ablation`)."""
    from .search.ablation import run_ablation as run

    return run(setup, out, **kwargs)


def distill(student, teacher, mix, config, out, **kwargs):
    """Recovery by distillation (:func:`vac.recover.distill.run_distill`)."""
    from .recover.distill import run_distill

    return run_distill(student, teacher, mix, config, out, **kwargs)


def quantize(src_dir, out_dir, **kwargs):
    """INT8 on the factors of a checkpoint folder (:func:`vac.deploy.quantize.quantize_checkpoint`)."""
    from .deploy.quantize import quantize_checkpoint

    return quantize_checkpoint(src_dir, out_dir, **kwargs)


def bench(checkpoint_dir, baseline=None, int8_dir=None, **kwargs):
    """Dense vs factorized speed, size and memory (:func:`vac.deploy.bench.bench`)."""
    from .deploy.bench import bench as run_bench

    return run_bench(checkpoint_dir, baseline, int8_dir, **kwargs)


def export_onnx(source, out, config=None, **kwargs):
    """One ONNX graph of a vac checkpoint or a dense model (:func:`vac.deploy.onnx_export.export_onnx`)."""
    from .deploy.onnx_export import export_onnx as run_export

    return run_export(source, out, config, **kwargs)
