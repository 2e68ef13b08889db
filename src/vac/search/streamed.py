"""``vac search --streamed``: the search with memory bounded by one decoder layer, not by the model.

What the in-memory search keeps for the whole model, this keeps on disk per layer, in ``OUT/cache``:

- ``stream/inputs/layer-NNNNN.pt``: the dense input statistics (XᵀX per group over all calibration
  windows, fp64) of one layer, written by one streamed forward pass; ``stream/fisher.pt``: the Fisher
  row/column sums of every linear (vectors, megabytes), from the layer-streamed Fisher pass of
  :mod:`vac.core.stream`. Same numbers as :func:`vac.search.scoring.search_statistics`.
- ``stream/factors-*/layer-NNNNN.safetensors``: per (method, Fisher exponent) the weighted-SVD factors of
  one layer's linears at the largest useful rank and their spectra, computed from that layer's
  statistics when a genome first needs the set (as :class:`vac.search.scoring.FactorCache`).

A generation is scored layers outer, genomes inner (:class:`StreamedScorer`): each dense layer is read
from the source shards once per generation, each genome's hidden states pass it with the genome's
truncated factors put in, and the layer is released. The full re-scores run ``vac compress``'s
streamed path (:func:`vac.core.stream.stream_compress`) into ``OUT/cache/full/<genome>`` and score the
checkpoint with :func:`vac.core.stream.stream_perplexity`; so do the short scores (of orders, or of
whole genomes), from the few short order windows (:meth:`StreamedEngine.short_score`).

Peak memory: the larger of ``vac compress``'s streamed peak (:mod:`vac.core.memory`) and one layer in
fp32 + one layer's statistics + one layer's factor set + the search windows' hidden states of every
genome of a generation (``population × search_windows × seq_len × hidden × 4`` bytes); the embedding
and the head are loaded only for a pass's first and last step. No state is kept between calls other
than the spectra (one vector per matrix).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write, torch_save
from ..cache import pack_fisher, pack_inputs, unpack_fisher, unpack_inputs
from ..core.allocate import DENSE, matrices_of, total_params
from ..core.calibrate import input_hooks
from ..core.driver import held_boundaries
from ..core.heap import bounded_heap
from ..core.orders import ORDERS, layer_order, outward
from ..core.stream import (
    Analysis,
    Layers,
    fisher_pass,
    skeleton,
    stream_compress,
    stream_perplexity,
    window_nll,
)
from ..faults import stage
from ..models.families import arch_for
from ..models.layers import make_low_rank, restored
from .scoring import FactorCache, factor_entry, finite, proxy_allocation
from .space import Genome, SearchSetup, assert_budget, max_step


def _layer(i: int) -> str:
    return f"layer-{i:05d}"


class StreamedFactors:
    """Dense statistics and factor sets of a model folder, per layer on disk (see the module doc)."""

    def __init__(self, layers: Layers, folder: Path, calib: torch.Tensor, setup: SearchSetup,
                 progress: bool = True, needs: dict[str, int] | None = None):
        self.layers, self.folder, self.calib, self.setup, self.progress = layers, Path(folder) / "stream", calib, setup, progress
        self.needs = needs or {}
        self.model, self.arch, self.n = layers.model, layers.arch, len(layers)
        self.spectra_memo: dict[str, dict[str, torch.Tensor]] = {}
        self.svds = 0
        self.fisher = self._fisher()
        self._inputs()

    def paths(self, i: int) -> list[str]:
        return [f"{self.arch.layer_path(i)}.{name}" for name in self.arch.linears]

    # statistics ------------------------------------------------------------------------------------
    def _fisher(self) -> dict:
        path = self.folder / "fisher.pt"
        if path.is_file():
            return unpack_fisher(torch.load(path, weights_only=True))
        analysis = Analysis()
        n = min(self.setup.fisher_windows, len(self.calib))
        fisher_pass(self.layers, self.calib[:n], analysis, None, curves=False, progress=self.progress)
        fisher = {p: type(f)(f.row.cpu(), f.col.cpu(), f.windows) for p, f in analysis.fisher.items()}
        torch_save(pack_fisher(fisher), path)
        return fisher

    def _stats_file(self, i: int) -> Path:
        return self.folder / "inputs" / f"{_layer(i)}.pt"

    @torch.no_grad()
    def _inputs(self) -> None:
        """One dense forward over the calibration batches; each layer's input statistics to its file
        (layers already on disk from a killed run are passed without recomputing them)."""
        if all(self._stats_file(i).is_file() for i in range(self.n)):
            return
        stage("the input statistics", self.needs.get("the input statistics"))
        stream = self.layers.stream
        batches = list(self.calib.split(self.setup.data_config().batch_size))
        hidden = self.layers.embed(batches)
        for i in tqdm(range(self.n), desc="input statistics (streamed)", unit="layer", disable=not self.progress):
            self.layers.load(i)
            inputs: dict = {}
            handles = [] if self._stats_file(i).is_file() else input_hooks(stream, i, inputs)
            try:
                hidden = [stream.layer(i, h, b) for h, b in zip(hidden, batches)]
            finally:
                for handle in handles:
                    handle.remove()
            if handles:
                torch_save(pack_inputs(inputs), self._stats_file(i))
            del inputs
            self.layers.release(i)

    # factor sets -----------------------------------------------------------------------------------
    def _set_dir(self, method: str, exponent: float) -> Path:
        return self.folder / FactorCache.name(method, exponent)

    def _factor_file(self, method: str, exponent: float, i: int) -> Path:
        return self._set_dir(method, exponent) / f"{_layer(i)}.safetensors"

    def ensure(self, method: str, exponent: float) -> None:
        """Compute the factor set's missing layers (each: the layer, its statistics, its SVDs)."""
        from safetensors.torch import save_file

        todo = [i for i in range(self.n) if not self._factor_file(method, exponent, i).is_file()]
        if not todo:
            return
        self._set_dir(method, exponent).mkdir(parents=True, exist_ok=True)
        stage("the factor sets", self.needs.get("the factor sets"))
        bar = tqdm(todo, desc=f"factors {FactorCache.name(method, exponent)}", unit="layer",
                   disable=not self.progress, leave=False)
        for i in bar:
            layer_stats = unpack_inputs(torch.load(self._stats_file(i), weights_only=True))
            self.layers.load(i)
            flat = {}
            for path in self.paths(i):
                flat |= factor_entry(path, self.model.get_submodule(path).weight, method, exponent,
                                     layer_stats.get(path), self.fisher.get(path))
                self.svds += 1
            self.layers.release(i)
            atomic_write(self._factor_file(method, exponent, i), lambda tmp, f=flat: save_file(f, str(tmp)))
            del flat, layer_stats

    def layer_factors(self, method: str, exponent: float, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from safetensors.torch import load_file

        flat = load_file(self._factor_file(method, exponent, i))
        return {p: (flat[f"{p}|up"], flat[f"{p}|down"]) for p in self.paths(i)}

    def spectra(self, method: str, exponent: float) -> dict[str, torch.Tensor]:
        """The allocation spectra of every matrix (read from the set's files, only the ``|s`` tensors)."""
        from safetensors import safe_open

        name = FactorCache.name(method, exponent)
        if name not in self.spectra_memo:
            self.ensure(method, exponent)
            memo = {}
            for i in range(self.n):
                with safe_open(self._factor_file(method, exponent, i), framework="pt") as f:
                    memo.update({p: f.get_tensor(f"{p}|s") for p in self.paths(i)})
            self.spectra_memo[name] = memo
        return self.spectra_memo[name]


class StreamedScorer:
    """Proxy scores of several genomes at once, layers outer (see the module doc); the numbers equal
    :class:`vac.search.scoring.ProxyScorer`'s."""

    def __init__(self, factors: StreamedFactors, windows: torch.Tensor, setup: SearchSetup):
        self.factors, self.windows, self.setup = factors, windows, setup
        self.model, self.arch = factors.model, factors.arch
        self.matrices = matrices_of(self.model)
        self.step_cost = max_step(self.matrices, setup.rank_step, setup.rank_floor)

    def allocation(self, genome: Genome):
        return proxy_allocation(genome, self.setup, self.matrices, self.arch, self.step_cost, self.factors.spectra)

    @torch.no_grad()
    def score_many(self, genomes: list[Genome], progress: bool = False) -> list[dict]:
        import math
        import time

        t0 = time.perf_counter()
        f, layers, stream = self.factors, self.factors.layers, self.factors.layers.stream
        ranks = [self.allocation(g)[1] for g in genomes]
        sets = sorted({(g.method, g.exponent) for g in genomes})
        for method, exponent in sets:
            f.ensure(method, exponent)
        stage("the proxy scores", self.factors.needs.get("the proxy scores"))
        ws = [w for w in self.windows.split(1)]
        start = layers.embed(ws)
        hidden = [start for _ in genomes]
        for i in tqdm(range(f.n), desc=f"proxy scores ({len(genomes)} genomes, streamed)", unit="layer",
                      disable=not progress, leave=False):
            layers.load(i)
            prefix = self.arch.layer_path(i) + "."
            for method, exponent in sets:  # one factor set of one layer in memory at a time
                factors = f.layer_factors(method, exponent, i)
                for j, g in enumerate(genomes):
                    if (g.method, g.exponent) != (method, exponent):
                        continue
                    with restored(self.model):
                        for path, r in ranks[j].items():
                            if path.startswith(prefix) and r != DENSE:
                                up, down = factors[path]
                                dense = self.model.get_submodule(path)
                                self.model.set_submodule(path, make_low_rank(dense, up[:, :r], down[:r]))
                        hidden[j] = [stream.layer(i, h, w) for h, w in zip(hidden[j], ws)]
                del factors
            layers.release(i)
        results, seconds = [], (time.perf_counter() - t0) / max(len(genomes), 1)
        dense_params = sum(m.dense_params for m in self.matrices)
        with layers.outer("head"):
            for j in range(len(genomes)):
                total, count = window_nll(stream, hidden[j], ws)
                after = total_params(self.matrices, ranks[j])
                results.append({"score": finite(math.exp(total / count)), "params_after": after,
                                "ratio_reached": dense_params / after, "seconds": seconds})
        return results


class StreamedEngine:
    """:class:`vac.search.scoring.InMemoryEngine`'s interface with memory bounded by one layer; the
    handles of full re-scores are checkpoint folders under ``cache/full``."""

    def __init__(self, setup: SearchSetup, cache: Path, workers: int = 1, progress: bool = True, log=None,
                 device="cpu"):
        from transformers import AutoTokenizer

        from ..errors import VacError
        from ..models.zoo import hub_snapshot, resolve_model

        if workers > 1:
            raise VacError("--workers needs the in-memory search (the streamed search scores a generation "
                           "in one pass over the layers)")
        source = resolve_model(setup.model)
        source = source if Path(source).is_dir() else hub_snapshot(source)
        if not any(Path(source).glob("*.safetensors")):
            raise VacError(f"--streamed reads safetensors weights; {setup.model} has none")
        self.setup, self.cache, self.device, self.source, self.progress = setup, Path(cache), device, source, progress
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        bounded_heap()
        # between passes the skeleton holds no weight (the passes load the embedding, the head and
        # each layer when they need them), so a full re-score's own skeleton is not a second copy
        self.model, reader = skeleton(source, device)
        self.layers = Layers(self.model, reader, device)

    def plan(self, calib: torch.Tensor, windows: torch.Tensor) -> dict[str, int]:
        """Bytes of each stage (:func:`vac.core.memory.search_bytes`), for the out-of-memory line."""
        from ..core.memory import Shapes, search_bytes

        reader, s, n = self.layers.reader, self.setup, len(self.layers)
        shapes = Shapes.of(self.model.config, arch_for(self.model), lambda name: reader.shape(f"{name}.weight"))
        orders = [layer_order(name, n) for name in ORDERS]
        orders += [outward(n, start, up) for start in range(n) for up in (True, False)]
        return search_bytes(shapes, population=s.population, search_windows=len(windows), calib_windows=len(calib),
                            seq_len=calib.shape[1], fisher_windows=s.fisher_windows,
                            batch_size=s.data_config().batch_size,
                            refine=Genome.default(n).config(s, full=True).strategy.refine,
                            held=max(map(held_boundaries, orders)))  # the orders a genome can reach

    def prepare(self, calib: torch.Tensor, windows: torch.Tensor) -> None:
        """The per-layer statistics on disk (computed once) and the proxy scorer."""
        self.calib, self.windows = calib, windows
        self.needs = self.plan(calib, windows)
        stage("the Fisher pass", self.needs["the Fisher pass"])
        self.factors = StreamedFactors(self.layers, self.cache, calib, self.setup, self.progress, self.needs)
        self.scorer = StreamedScorer(self.factors, windows, self.setup)
        self.step_cost = self.scorer.step_cost

    def proxy(self, genomes: list[Genome]) -> list[dict]:
        return self.scorer.score_many(genomes, self.progress)  # sets the stages it goes through

    def _folder(self, g: Genome) -> Path:
        return self.cache / "full" / hashlib.sha256(g.full_key().encode()).hexdigest()[:16]

    def _compress(self, g: Genome):
        """``g`` compressed as ``vac compress`` does (streamed, resumable after a kill) into its folder."""
        folder = self._folder(g)
        stage("the full re-scores", self.needs["the full re-scores"])
        result = stream_compress(self.source, self.tokenizer, g.config(self.setup, full=True), self.calib, folder,
                                 device=self.device, overwrite=True, progress=False)
        return folder, result

    def full(self, g: Genome):
        import time

        t0 = time.perf_counter()
        folder, result = self._compress(g)
        assert_budget(result.params_before, result.params_after, g.config(self.setup, full=True).strategy.resolved(),
                      self.step_cost)
        t1 = time.perf_counter()
        ppl = stream_perplexity(folder, self.windows, self.device, progress=False)["ppl"]
        entry = {"score": finite(ppl), "params_after": result.params_after, "ratio_reached": result.ratio}
        passes, seconds = result.recompute
        timing = dict(full_compress_s=t1 - t0, search_ppl_s=time.perf_counter() - t1, full_passes=passes,
                      pass_s=seconds / max(passes, 1))
        return entry, timing, folder

    def short_score(self, g: Genome, calib: torch.Tensor) -> dict:
        """The short score of ``g`` (as :meth:`vac.search.scoring.InMemoryEngine.short_score`):
        ``g`` compressed by the streamed ``vac compress`` from the order windows ``calib`` with the full
        re-scores' dense statistics (their cached Fisher sums and curves), its checkpoint scored on the
        search windows and removed."""
        import time

        t0 = time.perf_counter()
        cfg = self.setup.short_config(g)
        folder = self.cache / "orders" / hashlib.sha256(g.full_key().encode()).hexdigest()[:16]
        stage("the order scores", self.needs["the full re-scores"])  # a smaller streamed compression
        try:
            stream_compress(self.source, None, cfg, calib, folder, device=self.device, overwrite=True, progress=False,
                            statistics=self.calib)
            ppl = stream_perplexity(folder, self.windows, self.device, progress=False)["ppl"]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return {"score": finite(ppl), "seconds": time.perf_counter() - t0}

    def eval_ppl(self, g: Genome, handle, windows: torch.Tensor) -> float:
        folder = handle if handle is not None and (Path(handle) / "config.json").is_file() else self._compress(g)[0]
        return stream_perplexity(folder, windows, self.device, progress=False)["ppl"]

    def release(self, handles: list) -> None:
        for folder in handles:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        pass
