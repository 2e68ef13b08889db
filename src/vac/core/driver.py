"""The compression driver: calibrate → allocate → factorize (sequentially, in a layer order).

Every function takes a :class:`~vac.config.CompressConfig`; its strategy is resolved (method defaults
filled in) on entry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..config import CompressConfig
from ..errors import VacError
from ..faults import kill_point
from ..models.families import arch_for
from ..models.layers import factorize_
from .allocate import (
    ALLOCATIONS,
    DENSE,
    assign_ranks,
    component_ratios,
    matrices_of,
    total_params,
)
from .calibrate import (
    LayerStream,
    Statistics,
    fisher_stats,
    layer_input_stats,
    layer_pair_stats,
)
from .methods import decompose, strategy_weighting, tail_energy
from .orders import layer_order
from .refine import refine_layer


def dense_statistics(model, windows: torch.Tensor, cfg: CompressConfig, progress=True, cache=None) -> Statistics:
    """Statistics of the dense model, one layer at a time.

    Fisher (if the method uses it) comes from the first ``cfg.data.fisher_windows`` windows, and the same
    pass gathers their input statistics. A sequential compression only needs those for its
    allocation curves (it recomputes input statistics layer by layer as it goes); otherwise input
    statistics are gathered over all windows. ``cache(part, windows, compute)`` may supply a part
    (:class:`vac.cache.StatisticsCache`)."""
    s, d = cfg.strategy.resolved(), cfg.data
    part = cache or (lambda _name, _n, compute: compute())
    stats = Statistics()
    if s.needs_fisher:
        n = min(d.fisher_windows, len(windows))
        stats.fisher, stats.inputs = part("fisher", n, lambda: fisher_part(model, windows, d, progress))
    if s.needs_inputs and not (s.sequential and stats.inputs):
        n = min(d.fisher_windows, len(windows)) if s.sequential else len(windows)
        stats.inputs = part("inputs", n, lambda: input_part(model, windows[:n], d, progress))
    return stats


def fisher_part(model, windows: torch.Tensor, data, progress=True):
    """(Fisher, input statistics) of the first ``data.fisher_windows`` windows, from one pass."""
    inputs: dict = {}
    fisher = fisher_stats(model, windows[: data.fisher_windows], progress=progress, inputs=inputs)
    return fisher, inputs


def input_part(model, windows: torch.Tensor, data, progress=True) -> dict:
    """Input statistics of every group of linears over ``windows``, one layer at a time."""
    stream = LayerStream(model)
    batches = list(windows.split(data.batch_size))
    inputs: dict = {}
    with torch.no_grad():
        hidden = [stream.embed(b) for b in batches]
    for i in tqdm(range(len(stream)), desc="input statistics", unit="layer", disable=not progress):
        layer_stats, hidden = layer_input_stats(stream, i, hidden, batches)
        inputs.update(layer_stats)
    return inputs


@torch.no_grad()
def allocation_curves(model, stats: Statistics, cfg: CompressConfig) -> list:
    """Every decoder linear as a Matrix with its error curve: the discarded squared singular values
    of the method's weighted matrix, times its type weight."""
    s, arch = cfg.strategy.resolved(), arch_for(model)
    matrices = matrices_of(model)
    for m in matrices:
        w = strategy_weighting(s, stats.inputs.get(m.path), stats.fisher.get(m.path))
        sv = torch.linalg.svdvals(w.apply(model.get_submodule(m.path).weight))
        m.curve = tail_energy(sv).cpu() * (s.type_weights or {}).get(arch.kind(m.path), 1.0)
    return matrices


def allocate(model, stats: Statistics, cfg: CompressConfig) -> dict[str, int]:
    """The rank map of ``cfg``'s allocation (from the method's error curves when it uses them)."""
    s = cfg.strategy.resolved()
    if ALLOCATIONS[s.allocation].needs_curves:
        matrices = allocation_curves(model, stats, cfg)
    else:
        matrices = matrices_of(model)
    return assign_ranks(matrices, arch_for(model), s)


def check_budget(model, cfg: CompressConfig) -> None:
    """Raise a one-line VacError now if ``cfg`` cannot be met on this model (before any work): the
    ratio, the component split and the layer order."""
    s, arch = cfg.strategy.resolved(), arch_for(model)
    matrices = matrices_of(model)
    layer_order(s.order, len(model.get_submodule(arch.layers)))
    if not ALLOCATIONS[s.allocation].needs_curves:
        assign_ranks(matrices, arch, s)
        return
    floor = sum(min(m.params(r) for r in m.choices(s.rank_step, s.rank_floor)) for m in matrices)
    budget = sum(m.dense_params for m in matrices) / s.ratio
    if floor > budget:
        raise VacError(
            f"ratio {s.ratio:g} is too large: even rank {s.rank_floor} everywhere needs "
            f"{floor:,} parameters, the budget is {int(budget):,}"
        )
    component_ratios(matrices, arch, s)


def factorize_layer(model, layer: int, ranks, stats: Statistics, cfg: CompressConfig) -> None:
    """Factorize the linears of one decoder layer with the method's weighting from ``stats``."""
    arch, strategy = arch_for(model), cfg.strategy.resolved()
    prefix = arch.layer_path(layer) + "."
    todo = {p: r for p, r in ranks.items() if p.startswith(prefix) and r != DENSE}

    def factors(path, weight, rank):
        w = strategy_weighting(strategy, stats.inputs.get(path), stats.fisher.get(path))
        return w.factors(*decompose(weight, w), rank)

    factorize_(model, todo, factors)


@dataclass
class Result:
    ranks: dict[str, int]
    params_before: int
    params_after: int
    seconds: dict[str, float] = field(default_factory=dict)
    # sequential only: decoder-layer passes re-run to get inputs of later layers, and their seconds
    recompute: tuple[int, float] = (0, 0.0)

    @property
    def ratio(self) -> float:
        return self.params_before / self.params_after


def compress(
    model, windows: torch.Tensor, cfg: CompressConfig, progress: bool = True, stats: Statistics | None = None
) -> Result:
    """Compress ``model`` in place; ``windows`` [n, seq_len] are the calibration tokens.

    ``stats``: dense statistics computed before (e.g. shared by several compressions of the same
    model); they are not modified."""
    arch = arch_for(model)
    cfg = cfg.resolved()
    s = cfg.strategy
    matrices = matrices_of(model)
    clock = {"start": time.perf_counter()}

    def lap(name):
        now = time.perf_counter()
        clock[name] = now - clock.pop("_last", clock["start"])
        clock["_last"] = now

    windows = windows.to(next(model.parameters()).device)
    if stats is None:
        stats = dense_statistics(model, windows, cfg, progress)
    stats = Statistics(dict(stats.inputs), stats.fisher)
    lap("statistics")
    ranks = allocate(model, stats, cfg)
    lap("allocation")
    stream = LayerStream(model, arch)
    order = layer_order(s.order, len(stream))
    recompute = [0, 0.0]
    if not s.sequential:
        for i in tqdm(order, desc=f"factorize ({s.method})", unit="layer", disable=not progress):
            factorize_layer(model, i, ranks, stats, cfg)
    else:
        _sequential(model, stream, order, windows, ranks, stats, cfg, progress, recompute)
    lap("factorization")
    clock.pop("_last")
    clock.pop("start")
    kept = {p: r for p, r in ranks.items() if r != DENSE}
    return Result(kept, sum(m.dense_params for m in matrices), total_params(matrices, ranks), clock,
                  tuple(recompute))


def _advance(stream, cache: dict, i: int, batches, module_of, tally=None) -> list[torch.Tensor]:
    """Hidden states entering layer ``i``, from the nearest cached boundary below; caches them.
    ``tally`` ([passes, seconds]) accumulates the layer passes this took."""
    t0 = time.perf_counter()
    start = max(b for b in cache if b <= i)
    hidden = cache[start]
    with torch.no_grad():
        for j in range(start, i):
            hidden = [stream.layer(j, h, b, module_of(j)) for h, b in zip(hidden, batches)]
    cache[i] = hidden
    if tally is not None:
        tally[0] += i - start
        tally[1] += time.perf_counter() - t0
    return hidden


def sequential_passes(order: list[int]) -> int:
    """Decoder-layer passes ``_sequential`` re-runs (without ``correct`` or ``refine``, whose fit
    hands over the refined layer's outputs) to feed the layers in
    ``order``: L − 1 front-to-back, about L²/3 middle-out (each step back up the stack re-runs every
    layer changed since). Mirrors its boundary cache; the search uses it to cost an order."""
    return _walk(order, drops_above=True, hands_over=False)[0]


def held_boundaries(order: list[int]) -> int:
    """The most layer boundaries one stream of ``_sequential`` (or of the streamed factorization)
    holds at once for ``order``: the cached ones, the one entering the layer being done and the one
    leaving it. 2 front to back; more when the order steps back down (the compressed stream drops the
    boundaries above a changed layer, the dense stream keeps them while a later layer starts there)."""
    return max(_walk(order, drops_above=d, hands_over=True)[1] for d in (True, False))


def _walk(order: list[int], *, drops_above: bool, hands_over: bool) -> tuple[int, int]:
    """``(passes, most held)`` of one stream's boundary cache over ``order``: each layer starts from
    the nearest cached boundary below it; after it, the cache keeps only the boundaries a layer still
    to do starts from. ``drops_above``: the layer changed, so boundaries above it are stale (the
    compressed stream); ``hands_over``: its outputs become boundary i + 1 (refinement, dense stream)."""
    cache, remaining, passes, most = {0}, list(order), 0, 0
    for i in order:
        remaining.remove(i)
        passes += i - max(b for b in cache if b <= i)
        cache |= {i}
        most = max(most, len(cache) + 1)
        valid = ({b for b in cache if b <= i} if drops_above else cache) | ({i + 1} if hands_over else set())
        cache = {b for b in valid if b in boundary_starts(valid, remaining).values()}
    return passes, most


def boundary_starts(cache, remaining: list[int]) -> dict[int, int]:
    """For each layer still to do, the cached boundary its inputs would be computed from."""
    return {j: max(b for b in cache if b <= j) for j in remaining}


def _still_dense(j: int, done: set[int]) -> None:
    """The module the dense stream runs for layer ``j``: the model's own (``None``), which is still
    dense. Finishing layer i caches dense boundary i + 1, so every later start is above i and the
    dense stream never walks a factorized layer (asserted; no dense copy of a layer is kept)."""
    assert j not in done, f"the dense stream reached factorized layer {j}"
    return None


def _sequential(model, stream, order, windows, ranks, stats, cfg, progress, tally=None):
    """Factorize layers in ``order``, each from input statistics of windows that passed through the
    layers below it in their current (partly compressed) state.

    With ``correct`` the same windows also pass through the original dense layers, and each
    matrix is fitted to reproduce its dense outputs from its compressed inputs (the cross term of
    :class:`InputStats`), so errors of earlier layers are corrected, not only tolerated. With
    ``refine`` each factorized layer's factors are then fitted to the dense layer's outputs
    (:mod:`vac.core.refine`; target ``dense`` also keeps the dense stream).
    Boundary hidden states are cached while a later layer can start from them; compressed ones are
    dropped above each layer that changes. Front-to-back needs one cached boundary per stream;
    other orders recompute from the nearest valid boundary."""
    s = cfg.strategy
    batches = list(windows.split(cfg.data.batch_size))
    with torch.no_grad():
        embedded = [stream.embed(b) for b in batches]
    compressed, dense = {0: embedded}, {0: embedded}
    track_dense = s.correct or s.refine == "dense"
    remaining, done = list(order), set()
    bar = tqdm(order, desc=f"factorize ({s.method}, sequential)", unit="layer", disable=not progress)
    for i in bar:
        remaining.remove(i)
        hidden = _advance(stream, compressed, i, batches, lambda j: None, tally)
        if track_dense:
            dense_hidden = _advance(stream, dense, i, batches, lambda j: _still_dense(j, done))
        own = None  # the dense layer's outputs on the compressed inputs
        if s.correct:
            layer_stats, dense[i + 1] = layer_pair_stats(stream, i, hidden, dense_hidden, batches)
        else:
            layer_stats, own = layer_input_stats(stream, i, hidden, batches)
            if track_dense:
                with torch.no_grad():
                    dense[i + 1] = [stream.layer(i, h, b) for h, b in zip(dense_hidden, batches)]
        target = {"own": own, "dense": dense.get(i + 1)}.get(s.refine)
        if track_dense:
            starts = boundary_starts(dense, remaining)
            dense = {b: h for b, h in dense.items() if b in starts.values()}
            done.add(i)
        stats.inputs.update(layer_stats)
        factorize_layer(model, i, ranks, stats, cfg)
        refined = None
        if s.refine != "none":
            refined = refine_layer(stream, i, hidden, target, batches, s.refine_steps, s.refine_lr, keep=list)
        del own, target
        kill_point("sequential")
        for path in layer_stats:  # a factorized layer's statistics are not needed again
            stats.inputs.pop(path, None)
        valid = {b: h for b, h in compressed.items() if b <= i}
        if refined is not None and refined.outputs is not None:  # the refined layer's outputs: boundary i + 1
            valid[i + 1] = refined.outputs
        del refined
        compressed = {b: h for b, h in valid.items() if b in boundary_starts(valid, remaining).values()}
