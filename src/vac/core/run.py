"""What ``vac compress`` does, as one library call: load → check → calibrate → compress → measure →
report → save. The CLI parses options into a :class:`~vac.config.CompressConfig` and prints; the
benchmarks and users call :func:`compress_model` (or the in-memory :func:`vac.compress`) directly.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..atomic import check_output
from ..config import CompressConfig, EvalConfig
from ..errors import VacError
from ..faults import stage
from .driver import Result, check_budget
from .rss import peak_rss_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_rss_mb() -> float:
    return peak_rss_bytes() / 2**20


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
    stage("the calibration statistics")
    stats = [cached_dense_statistics(model, windows, config, source, log=log, progress=progress)]
    stats_seconds = time.perf_counter() - t0
    # handed over, not kept here: compress frees each layer's statistics once that layer is done
    stage("the factorization")
    result = compress(model, windows, config, progress=progress, stats=stats.pop())
    result.seconds["statistics"] = stats_seconds
    return result


def compress_model(model: str, out: str | Path, config: CompressConfig | None = None, *,
                   evaluation: EvalConfig = EvalConfig(), dtype: str | None = None, device: str | None = None,
                   stats_cache: bool = True, overwrite: bool = False, command: str | None = None,
                   stream: bool = True, progress: bool = True, log=None, offload_dir=None) -> dict:
    """The whole ``vac compress`` job: compress ``model`` (embedded name, folder or hub id) and save
    the checkpoint at ``out`` with ``report.json`` and ``ranks.png``; returns the report.

    A local safetensors folder is compressed layer by layer (:mod:`vac.core.stream`: memory bounded
    by one decoder layer, resumable), a hub id from its downloaded snapshot; ``stream=False``, weights
    that are not safetensors and the settings that stream cannot serve (``--correct``, non-monotone
    sequential orders) load the whole model (:mod:`vac.core.driver`).
    ``dtype``: storage dtype of the checkpoint, ``fp32`` | ``bf16`` (default: the source's).
    ``offload_dir``: the streamed passes keep the calibration hidden states in files there.
    Under ``torchrun`` the streamed path shares the calibration across the ranks
    (:mod:`vac.core.distributed`); rank 0 returns the report, the others ``{}``."""
    from ..data.specs import check_disjoint
    from ..models.zoo import pick_device, resolve_model
    from .distributed import init_from_env, launched
    from .offload import offload_folder
    from .stream import streamable

    config = (config or CompressConfig()).resolved()
    d = config.data
    if dtype is not None and dtype not in DTYPES:
        raise VacError(f"--dtype must be {' or '.join(DTYPES)}, got {dtype}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise VacError(f"output folder {out} already exists (pass --overwrite to replace it)")
    check_output(out, {"model": model, "calibration data": d.calib, "evaluation data": evaluation.data})
    if offload_dir is not None:
        offload_folder(offload_dir)  # refused before any work
    check_disjoint([("calibration", d.calib, "evaluation", evaluation.data, "--calib or --eval", "")])
    job = _Job(model, out, config, evaluation, dtype, command, progress, log, time.perf_counter(), offload_dir)
    target = pick_device(device)
    source = resolve_model(model)
    why = streamable(config) if stream else "stream=False"
    if why is None and not Path(source).is_dir():  # a hub id: downloaded, then streamed from the snapshot
        from ..models.zoo import hub_snapshot

        source = hub_snapshot(source)
    if why is None and not Path(source, "config.json").is_file():
        why = "a model folder without config.json"
    if why is None and not any(Path(source).glob("*.safetensors")):
        why = "weights that are not safetensors"
    if why is None:
        return job.streamed(source, init_from_env(target), stats_cache)
    if launched():
        raise VacError(f"several processes (torchrun) need the streamed compression, which does not serve {why}")
    if offload_dir is not None:
        raise VacError(f"--offload-dir needs the streamed compression, which does not serve {why}")
    if log and stream:
        log(f"compressing in memory (the whole model is loaded): streaming does not serve {why}")
    return job.in_memory(source, target, stats_cache)


class _Job:
    """One ``compress_model`` call: the two ways of running it share the report."""

    def __init__(self, model, out, config, evaluation, dtype, command, progress, log, started, offload_dir=None):
        self.model, self.out, self.config, self.ev, self.dtype = model, out, config, evaluation, dtype
        self.command, self.progress, self.log, self.started = command, progress, log, started
        self.offload_dir = offload_dir

    def streamed(self, source: str, target, stats_cache: bool) -> dict:
        from transformers import AutoConfig, AutoTokenizer

        from ..data.windows import sample_windows
        from .distributed import is_main
        from .evaluate import measured_ppl
        from .stream import skeleton, stream_compress, stream_perplexity

        d, ev = self.config.data, self.ev
        tok = AutoTokenizer.from_pretrained(source) if _has_tokenizer(source) else None
        if tok is None:
            raise VacError(f"{self.model} has no tokenizer")
        if AutoConfig.from_pretrained(source).model_type.startswith("vac_"):
            raise VacError(f"{self.model} is already a vac checkpoint; compress its dense source model")
        net, reader = skeleton(source, "meta")  # shapes only: no tensor is read
        check_budget(net, self.config)
        dtype = DTYPES[self.dtype] if self.dtype else reader.dtype()
        windows = sample_windows(tok, d.calib, d.seq_len, d.calib_windows, d.seed)
        before = measured_ppl(None, tok, source, ev.data, d.seq_len, ev.windows, cache=True, progress=self.progress,
                              score=lambda w: stream_perplexity(source, w, target, self.progress)) if ev.data and is_main() else None
        shapes = {p: reader.shape(f"{p}.weight") for p in _linears(net)}
        report = {}

        def finish(folder, result):
            after = measured_ppl(None, tok, str(folder), ev.data, d.seq_len, ev.windows, progress=self.progress,
                                 score=lambda w: stream_perplexity(folder, w, target, self.progress)) if ev.data else None
            params = sum(math.prod(t.get_shape()) for t in _slices(folder))
            report.update(self.report(net, result, shapes, before, after, params, target, dtype, streamed=True))
            return {"report.json": self._saved(report), "ranks.png": self.png(result)}

        stream_compress(source, tok, self.config, windows, self.out, dtype=dtype, device=target,
                        overwrite=True, finish=finish, stats_cache=stats_cache, progress=self.progress,
                        log=self.log, offload_dir=self.offload_dir)
        if not is_main():  # under torchrun rank 0 measures, reports and saves
            return {}
        report["seconds"]["total"] = time.perf_counter() - self.started
        return report | {"rank_rows": self.rank_rows}

    def in_memory(self, source: str, target, stats_cache: bool) -> dict:
        from .. import checkpoint
        from ..models.zoo import load_model
        from .evaluate import measured_ppl

        d, ev = self.config.data, self.ev
        net, tok = load_model(self.model)
        if tok is None:
            raise VacError(f"{self.model} has no tokenizer")
        dtype = DTYPES[self.dtype] if self.dtype else _source_dtype(source)
        net.to(target)
        check_budget(net, self.config)
        before = measured_ppl(net, tok, source, ev.data, d.seq_len, ev.windows, cache=True,
                              progress=self.progress) if ev.data else None
        shapes = {p: tuple(net.get_submodule(p).weight.shape) for p in _linears(net)}
        result = in_memory_compress(net, tok, self.config, source=source if stats_cache else None,
                                    progress=self.progress, log=self.log, device=target, checked=True)
        after = measured_ppl(net, tok, source, ev.data, d.seq_len, ev.windows, progress=self.progress) if ev.data else None
        report = self.report(net, result, shapes, before, after, sum(p.numel() for p in net.parameters()), target,
                             dtype, streamed=False)
        png = self.png(result)
        net.to("cpu")
        checkpoint.save(net, tok, self.out, overwrite=True, dtype=dtype,
                        extra={"report.json": self._saved(report), "ranks.png": png})
        return report | {"rank_rows": self.rank_rows}

    def report(self, net, result, shapes, before, after, params_after, target, dtype, streamed: bool) -> dict:
        from ..models.families import arch_for
        from .allocate import reached_ratios
        from .report import rank_grid

        s, d, ev = self.config.strategy, self.config.data, self.ev
        arch = arch_for(net)
        n_layers = len(net.get_submodule(arch.layers))
        self.rank_rows = rank_grid(arch, n_layers, result.ranks, shapes)
        comp = reached_ratios(matrices_of_shapes(arch, n_layers, shapes), arch, result.ranks)
        return {
            "model": self.model, "config": s.to_dict(), "data": d.to_dict(),
            "decoder_linear_params": {"before": result.params_before, "after": result.params_after},
            "ratio_reached": result.ratio, "component_ratio": comp, "model_params_after": params_after,
            "ppl_before": before, "ppl_after": after,
            "protocol": f"{ev.windows} non-overlapping windows of {d.seq_len} tokens of {ev.data}, "
                        "all shifted tokens scored, use_cache=False",
            "seconds": {**result.seconds, "total": time.perf_counter() - self.started},
            "peak_rss_mb": peak_rss_mb(), "device": str(target), "ranks": result.ranks,
            "cuda_max_allocated_mb": torch.cuda.max_memory_allocated(target) / 2**20 if target.type == "cuda" else None,
            "dtype": str(dtype).removeprefix("torch."), "streamed": streamed, "command": self.command,
        }

    def png(self, result) -> bytes:
        from .report import heatmap

        kinds, rows = self.rank_rows
        return heatmap(kinds, rows, f"{self.model} {self.config.strategy.method} {result.ratio:.2f}x")

    @staticmethod
    def _saved(report: dict) -> dict:
        return {k: v for k, v in report.items() if k != "rank_rows"}


def _linears(net) -> list[str]:
    from ..models.families import arch_for

    arch = arch_for(net)
    return arch.decoder_linears(len(net.get_submodule(arch.layers)))


def _has_tokenizer(folder: str) -> bool:
    return any(Path(folder, f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _source_dtype(source: str) -> torch.dtype:
    """The storage dtype of a model folder's weights (fp32 for anything else)."""
    from .stream import ShardReader

    try:
        return ShardReader(source).dtype()
    except VacError:
        return torch.float32


def _slices(folder):
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                yield sf.get_slice(k)


def matrices_of_shapes(arch, n_layers: int, shapes: dict) -> list:
    """The decoder linears as allocation matrices, from their dense shapes (before factorization)."""
    from .allocate import Matrix

    return [Matrix(p, *shapes[p]) for p in arch.decoder_linears(n_layers)]
