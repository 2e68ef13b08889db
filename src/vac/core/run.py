"""What ``vac compress`` does, as one library call: load → check → calibrate → compress → measure →
report → save. The CLI parses options into a :class:`~vac.config.CompressConfig` and prints; the
benchmarks and users call :func:`compress_model` (or the in-memory :func:`vac.compress`) directly.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

from ..atomic import check_output
from ..config import CompressConfig, EvalConfig
from ..errors import VacError
from .driver import Result, check_budget

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_memory_compress(model, tokenizer, config: CompressConfig, *, calibration=None, source: str | None = None,
                       progress: bool = True, log=None, device=None, checked: bool = False) -> Result:
    """Compress ``model`` in place (see :func:`vac.compress`); ``checked``: the budget was checked."""
    from ..cache import cached_dense_statistics
    from ..data.windows import sample_windows
    from .driver import compress

    config = config.resolved()
    if not checked:
        check_budget(model, config)
    d = config.data
    if calibration is None or isinstance(calibration, str):
        if tokenizer is None:
            raise VacError("calibration text needs a tokenizer")
        windows = sample_windows(tokenizer, calibration or d.calib, d.seq_len, d.calib_windows, d.seed)
    else:
        windows = torch.as_tensor(calibration, dtype=torch.long)
        if windows.dim() != 2 or windows.shape[1] < 2:
            raise VacError(f"calibration windows must be a [n, seq_len] tensor of token ids, got {tuple(windows.shape)}")
    windows = windows.to(device or next(model.parameters()).device)
    t0 = time.perf_counter()
    stats = [cached_dense_statistics(model, windows, config, source, log=log, progress=progress)]
    stats_seconds = time.perf_counter() - t0
    # handed over, not kept here: compress frees each layer's statistics once that layer is done
    result = compress(model, windows, config, progress=progress, stats=stats.pop())
    result.seconds["statistics"] = stats_seconds
    return result


def compress_model(model: str, out: str | Path, config: CompressConfig | None = None, *,
                   evaluation: EvalConfig = EvalConfig(), dtype: str = "fp32", device: str | None = None,
                   stats_cache: bool = True, overwrite: bool = False, command: str | None = None,
                   progress: bool = True, log=None) -> dict:
    """The whole ``vac compress`` job: compress ``model`` (embedded name, folder or hub id) and save
    the checkpoint at ``out`` with ``report.json`` and ``ranks.png``; returns the report."""
    from .. import checkpoint
    from ..data.specs import check_disjoint
    from ..models.families import arch_for
    from ..models.zoo import load_model, pick_device, resolve_model
    from .allocate import reached_ratios
    from .evaluate import measured_ppl
    from .report import heatmap, rank_grid

    config = (config or CompressConfig()).resolved()
    s, d = config.strategy, config.data
    if dtype not in DTYPES:
        raise VacError(f"--dtype must be {' or '.join(DTYPES)}, got {dtype}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise VacError(f"output folder {out} already exists (pass --overwrite to replace it)")
    check_output(out, {"model": model, "calibration data": d.calib, "evaluation data": evaluation.data})
    check_disjoint([("calibration", d.calib, "evaluation", evaluation.data, "--calib or --eval", "")])
    started = time.perf_counter()
    target = pick_device(device)
    source = resolve_model(model)
    net, tok = load_model(model)
    if tok is None:
        raise VacError(f"{model} has no tokenizer")
    net.to(target)
    arch = arch_for(net)
    check_budget(net, config)
    ev = evaluation

    before = measured_ppl(net, tok, source, ev.data, d.seq_len, ev.windows, cache=True,
                          progress=progress) if ev.data else None
    shapes = {n: tuple(m.weight.shape) for n, m in net.named_modules() if hasattr(m, "weight")
              and m.weight is not None and m.weight.dim() == 2}
    result = in_memory_compress(net, tok, config, source=source if stats_cache else None, progress=progress,
                                log=log, device=target, checked=True)
    after = measured_ppl(net, tok, source, ev.data, d.seq_len, ev.windows, progress=progress) if ev.data else None
    n_layers = len(net.get_submodule(arch.layers))
    kinds, rows = rank_grid(arch, n_layers, result.ranks, shapes)
    comp = reached_ratios(matrices_of_shapes(arch, n_layers, shapes), arch, result.ranks)
    report = {
        "model": model, "config": s.to_dict(), "data": d.to_dict(),
        "decoder_linear_params": {"before": result.params_before, "after": result.params_after},
        "ratio_reached": result.ratio, "component_ratio": comp,
        "model_params_after": sum(p.numel() for p in net.parameters()),
        "ppl_before": before, "ppl_after": after,
        "protocol": f"{ev.windows} non-overlapping windows of {d.seq_len} tokens of {ev.data}, "
                    "all shifted tokens scored, use_cache=False",
        "seconds": {**result.seconds, "total": time.perf_counter() - started},
        "peak_rss_mb": peak_rss_mb(), "device": str(target), "ranks": result.ranks,
        "dtype": dtype, "command": command,
    }
    png = heatmap(kinds, rows, f"{model} {s.method} {result.ratio:.2f}x")
    net.to("cpu")
    checkpoint.save(net, tok, out, overwrite=overwrite, dtype=DTYPES[dtype],
                    extra={"report.json": report, "ranks.png": png})
    report["rank_rows"] = (kinds, rows)  # for the caller's rank table; not saved
    return report


def matrices_of_shapes(arch, n_layers: int, shapes: dict) -> list:
    """The decoder linears as allocation matrices, from their dense shapes (before factorization)."""
    from .allocate import Matrix

    return [Matrix(p, *shapes[p]) for p in arch.decoder_linears(n_layers)]
