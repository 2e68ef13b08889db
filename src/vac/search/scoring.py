"""What ``vac search`` computes once and reuses: dense statistics, weighted-SVD factors per
(method, exponent), and the proxy scorer that turns a genome into a perplexity by truncation.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..cache import StatisticsCache
from ..config import CompressConfig
from ..core.allocate import (
    ALLOCATIONS,
    DENSE,
    Matrix,
    assign_ranks,
    matrices_of,
    total_params,
)
from ..core.calibrate import Statistics
from ..core.driver import compress, fisher_part, input_part
from ..core.evaluate import perplexity
from ..core.methods import decompose, tail_energy, weighting
from ..models.families import arch_for
from ..models.layers import factorize_, max_useful_rank, restored
from .space import Genome, SearchSetup, assert_budget, max_step

# ----------------------------------------------------------------------------- caches


def search_statistics(model, calib: torch.Tensor, setup: SearchSetup, source: str | None,
                      progress: bool = True, log=None) -> tuple[Statistics, Statistics]:
    """(proxy, sequential) dense statistics from the statistics cache of ``vac compress``
    (:class:`vac.cache.StatisticsCache`, ``source`` the model folder; None: not cached).

    ``sequential``: exactly what ``compress`` computes for a sequential vac config (Fisher over the
    first ``fisher_windows`` windows, with the input statistics of those windows); ``proxy``: the same
    Fisher with input statistics over all calibration windows (what a non-sequential vac uses)."""
    data = setup.data_config()
    part = StatisticsCache(source, data, calib, log)
    n = min(data.fisher_windows, len(calib))
    fisher, seq_inputs = part("fisher", n, lambda: fisher_part(model, calib, data, progress))
    inputs = part("inputs", len(calib), lambda: input_part(model, calib, data, progress))
    return Statistics(inputs, fisher), Statistics(seq_inputs, fisher)


class FactorCache:
    """Weighted SVD factors of every matrix per (method, exponent), at the largest useful rank: a rank
    ``r`` factorization is ``up[:, :r] @ down[:r]``, the same as factorizing at rank ``r``. Kept on
    disk (safetensors) and the last ``keep`` sets in memory; spectra of all sets in memory."""

    def __init__(self, folder: Path, model, stats: Statistics | None = None, keep: int = 2,
                 asvd_alpha: float | None = None):
        self.folder, self.model, self.stats, self.keep, self.asvd_alpha = folder, model, stats, keep, asvd_alpha
        self.memory: OrderedDict[str, dict] = OrderedDict()
        self.spectra_memo: dict[str, dict[str, torch.Tensor]] = {}
        self.svds = 0  # weighted SVDs computed by this cache (tests: none per candidate)

    @staticmethod
    def name(method: str, exponent: float) -> str:
        return "factors-whiten" if method == "whiten" else f"factors-{method}-{exponent:.6f}"

    def get(self, method: str, exponent: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        name = self.name(method, exponent)
        if name in self.memory:
            self.memory.move_to_end(name)
            return self.memory[name]
        path = self.folder / f"{name}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            flat = load_file(path)
        else:
            flat = self._compute(method, exponent)
            from safetensors.torch import save_file

            atomic_write(path, lambda tmp: save_file(flat, str(tmp)))
        paths = sorted({k.rsplit("|", 1)[0] for k in flat})
        self.spectra_memo[name] = {p: flat[f"{p}|s"] for p in paths}
        entry = {p: (flat[f"{p}|up"], flat[f"{p}|down"]) for p in paths}
        self.memory[name] = entry
        while len(self.memory) > self.keep:
            self.memory.popitem(last=False)
        return entry

    def spectra(self, method: str, exponent: float) -> dict[str, torch.Tensor]:
        name = self.name(method, exponent)
        if name not in self.spectra_memo:
            self.get(method, exponent)
        return self.spectra_memo[name]

    @torch.no_grad()
    def _compute(self, method: str, exponent: float) -> dict[str, torch.Tensor]:
        if self.stats is None:
            raise RuntimeError(f"factor set {self.name(method, exponent)} is missing and there are no statistics")
        flat = {}
        for m in matrices_of(self.model):
            flat |= factor_entry(m.path, self.model.get_submodule(m.path).weight, method, exponent,
                                 self.stats.inputs.get(m.path), self.stats.fisher.get(m.path), self.asvd_alpha)
            self.svds += 1
        return flat


@torch.no_grad()
def factor_entry(path: str, weight: torch.Tensor, method: str, exponent: float, inputs, fisher,
                 asvd_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """One matrix of a factor set: ``path|up``, ``path|down`` (the weighted SVD at the largest useful
    rank, fp32) and ``path|s``, its allocation spectrum exactly as core.driver.allocation_curves computes
    it (svdvals of the weighted matrix, not the SVD's s)."""
    w = weighting(method, inputs, fisher, exponent, asvd_alpha)
    u, s, vh = decompose(weight, w)
    up, down = w.factors(u, s, vh, max_useful_rank(*weight.shape))
    return {f"{path}|up": up.float().contiguous(), f"{path}|down": down.float().contiguous(),
            f"{path}|s": torch.linalg.svdvals(w.apply(weight)).contiguous()}


def finite(x: float) -> float:
    return x if math.isfinite(x) else float("inf")


def proxy_allocation(genome: Genome, setup: SearchSetup, matrices, arch, step_cost: int,
                     spectra) -> tuple[CompressConfig, dict[str, int]]:
    """The genome's proxy config and its rank map, from the cached spectra (``spectra(method,
    exponent)``: no SVD)."""
    cfg = genome.config(setup, full=False)
    s = cfg.strategy
    matrices = [Matrix(m.path, m.out_features, m.in_features) for m in matrices]
    if ALLOCATIONS[s.allocation].needs_curves:
        curves = spectra(genome.method, genome.exponent)
        weights = s.type_weights or {}
        for m in matrices:
            m.curve = tail_energy(curves[m.path]) * weights.get(arch.kind(m.path), 1.0)
    ranks = assign_ranks(matrices, arch, s)
    assert_budget(sum(m.dense_params for m in matrices), total_params(matrices, ranks), s, step_cost)
    return cfg, ranks


class ProxyScorer:
    """Scores genomes under the proxy: knapsack over cached spectra, truncation of cached factors
    (no sequential statistics), perplexity on the search windows."""

    def __init__(self, model, windows: torch.Tensor, setup: SearchSetup, factors: FactorCache):
        self.model, self.windows, self.setup, self.factors = model, windows, setup, factors
        self.arch = arch_for(model)
        self.matrices = matrices_of(model)
        self.step_cost = max_step(self.matrices, setup.rank_step, setup.rank_floor)

    def allocation(self, genome: Genome) -> tuple[CompressConfig, dict[str, int]]:
        return proxy_allocation(genome, self.setup, self.matrices, self.arch, self.step_cost, self.factors.spectra)

    def score(self, genome: Genome) -> dict:
        """The genome's proxy perplexity: the model truncated in place from the cached factors, scored,
        and dense again (no copy of the model)."""
        t0 = time.perf_counter()
        _, ranks = self.allocation(genome)
        factors = self.factors.get(genome.method, genome.exponent)
        with restored(self.model):
            factorize_(self.model, {p: r for p, r in ranks.items() if r != DENSE},
                       lambda path, _w, r: (factors[path][0][:, :r], factors[path][1][:r]))
            ppl = perplexity(self.model, self.windows, progress=False)["ppl"]
        after = total_params(self.matrices, ranks)
        return {"score": finite(ppl), "params_after": after,
                "ratio_reached": sum(m.dense_params for m in self.matrices) / after,
                "seconds": time.perf_counter() - t0}


_WORKER: dict = {}


def worker_init(model_spec: str, windows: torch.Tensor, setup_json: dict, folder: str, threads: int):
    from ..models.zoo import load_model

    torch.set_num_threads(threads)
    model, _ = load_model(model_spec)
    setup = SearchSetup(**setup_json)
    _WORKER["scorer"] = ProxyScorer(model, windows, setup, FactorCache(Path(folder), model))


def worker_score(genome: dict) -> dict:
    return _WORKER["scorer"].score(Genome.from_dict(genome))


def full_compress(model, calib: torch.Tensor, stats: Statistics, cfg: CompressConfig, step_cost: int):
    """``(modules, result)``: ``model`` compressed under ``cfg`` (what ``vac compress`` does) as the
    modules that replace its linears (score them with :func:`vac.models.layers.applied`) and the
    Result; ``model`` is dense again afterwards."""
    with restored(model) as modules:
        result = compress(model, calib, cfg, progress=False, stats=stats)
    assert_budget(result.params_before, result.params_after, cfg.strategy.resolved(), step_cost)
    return modules, result


class InMemoryEngine:
    """What ``vac search`` scores with when the whole model is loaded: the dense statistics and factor
    sets in memory (:class:`FactorCache`), proxy scores by :class:`ProxyScorer` (or worker processes),
    full re-scores by the in-memory pipeline. :class:`vac.search.streamed.StreamedEngine` is the same
    interface with memory bounded by one layer."""

    def __init__(self, setup: SearchSetup, cache: Path, workers: int = 1, progress: bool = True, log=None):
        from ..errors import VacError
        from ..models.zoo import load_model

        self.setup, self.cache, self.workers, self.progress, self.log = setup, cache, workers, progress, log
        self.model, self.tokenizer = load_model(setup.model)
        if self.tokenizer is None:
            raise VacError(f"{setup.model} has no tokenizer")
        self.pool = None

    def prepare(self, calib: torch.Tensor, windows: torch.Tensor) -> None:
        """The dense statistics (from the statistics cache of ``vac compress``) and the proxy scorer."""
        from ..models.zoo import resolve_model

        self.calib, self.windows = calib, windows
        self.proxy_stats, self.seq_stats = search_statistics(self.model, calib, self.setup,
                                                             resolve_model(self.setup.model), self.progress, self.log)
        self.factors = FactorCache(self.cache, self.model, self.proxy_stats)
        self.scorer = ProxyScorer(self.model, windows, self.setup, self.factors)
        self.step_cost = self.scorer.step_cost

    def proxy(self, genomes: list[Genome]):
        """The proxy scores of ``genomes``, in order, as they come (the caller saves each)."""
        if self.workers > 1 and len(genomes) > 1:
            for g in genomes:
                self.factors.get(g.method, g.exponent)  # on disk before the workers read them
            return self._pool().map(worker_score, [g.to_dict() for g in genomes])
        return (self.scorer.score(g) for g in genomes)

    def _pool(self):
        if self.pool is None:
            import multiprocessing
            import os
            from concurrent.futures import ProcessPoolExecutor

            threads = max(1, (os.cpu_count() or 1) // self.workers)
            self.pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init,
                initargs=(self.setup.model, self.windows, self.setup.to_json(), str(self.cache), threads),
            )
        return self.pool

    def full(self, g: Genome):
        """``(entry, timing, handle)``: the full-config score of ``g`` on the search windows, the costs
        of getting it, and what :meth:`eval_ppl` reuses (the compressed modules)."""
        from ..models.layers import applied

        t0 = time.perf_counter()
        modules, result = full_compress(self.model, self.calib, self.seq_stats, g.config(self.setup, full=True),
                                        self.step_cost)
        t1 = time.perf_counter()
        with applied(self.model, modules) as net:
            ppl = perplexity(net, self.windows, progress=False)["ppl"]
        t2 = time.perf_counter()
        entry = {"score": finite(ppl), "params_after": result.params_after, "ratio_reached": result.ratio}
        timing = dict(full_compress_s=t1 - t0, search_ppl_s=t2 - t1, full_passes=result.recompute[0],
                      pass_s=result.recompute[1] / max(result.recompute[0], 1))
        return entry, timing, modules

    def short_score(self, g: Genome, calib: torch.Tensor) -> dict:
        """The short score of ``g`` (of its layer order, or under ``proxy_score="short"`` of every gene):
        ``g`` compressed sequentially as ``vac compress`` does, refinement included
        (:meth:`SearchSetup.short_config`), from the few short calibration windows ``calib`` of
        :meth:`SearchSetup.order_data`, the dense statistics (Fisher, allocation) the full re-scores' own;
        its perplexity on the search windows."""
        from ..models.layers import applied

        t0 = time.perf_counter()
        modules, result = full_compress(self.model, calib, self.seq_stats, self.setup.short_config(g), self.step_cost)
        with applied(self.model, modules) as net:
            ppl = perplexity(net, self.windows, progress=False)["ppl"]
        return {"score": finite(ppl), "seconds": time.perf_counter() - t0}

    def eval_ppl(self, g: Genome, handle, windows: torch.Tensor) -> float:
        from ..models.layers import applied

        if handle is None:
            handle, _ = full_compress(self.model, self.calib, self.seq_stats, g.config(self.setup, full=True),
                                      self.step_cost)
        with applied(self.model, handle) as net:
            return perplexity(net, windows, progress=False)["ppl"]

    def release(self, handles: list) -> None:
        """Handles no longer needed (modules: dropped by the caller)."""

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

