"""Evolutionary strategy search at a fixed parameter budget (``vac search``).

A *genome* is one compression strategy: a layer order (a permutation of the decoder layers, started
from middle-out, front-to-back or back-to-front and changed by swap / segment-reverse mutations), the
Fisher exponent (vac), the attention/MLP budget split (``attn_ratio = 1 + (ratio − 1)·share``), the
allocation within each component (uniform ranks, or the knapsack with per-matrix-type curve weights
``VacConfig.type_weights``, powers of two) and the method (vac, or whiten = vac without Fisher
weighting). Every genome decodes to a :class:`~vac.pipeline.VacConfig` at the requested ratio:
:func:`assert_budget` checks each candidate's rank map (never more parameters than the budget; from the
knapsack, less than one rank step per component below it; uniform ranks round each matrix down), so
no candidate can win by compressing less.

Fitness is perplexity on a *search* split (``austen:search`` by default) whose documents are disjoint
from the calibration and the evaluation documents (:func:`check_sources`, by ``corpora.SPLIT_DOCS``
for the built-in corpora, by file content otherwise). The winner is scored once on the evaluation
split (and so is the default, as the reference).

Speed. Everything that does not depend on the genome is computed once: the dense statistics (cached
in ``OUT/cache/<key>/statistics.pt``) and, per (method, Fisher exponent), the weighted SVD of every
matrix, stored as factor pairs at the largest useful rank (``factors-*.safetensors``): a candidate's
allocation is a knapsack over the cached spectra and its factorization a truncation of the cached
factors, with no new SVD. The sequential compression of the full method recomputes statistics layer by
layer and costs minutes per candidate on a CPU, so by default (``proxy=True``) candidates are scored
with ``sequential=False`` (dense statistics, cached factors) on a few search windows; the proxy cannot
see the layer order, which matters only for sequential compression, so the orders ride along and are
selected in the final stage: the top-k genomes by proxy fitness plus the default are re-scored with
the full configuration (sequential, as ``vac compress``) on the search split, and the best of those
is the winner. ``proxy=False`` scores every candidate with the full configuration (GPU-sized budgets).

Resume. The state (population, fitness archive, RNG state, generation index, the final-stage scores)
is written atomically to ``OUT/state.json`` after every evaluation and every generation; rerunning the
same command continues where it stopped and gives the same result as an uninterrupted run (a run that
stops for ``--budget-minutes`` depends on the clock; the number of generations done is recorded).
Results are deterministic for a seed on a given machine and worker count.

Outputs in ``OUT``: ``strategy.json`` (``vac compress --strategy``; read by :func:`load_strategy`),
``search.json`` (summary, top genomes, history), ``fitness.png`` (best/median per generation).
:func:`run_ablation` compresses the default with one setting changed at a time (order, exponent,
allocation) and writes ``ablation.json`` and ``ablation.md``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import statistics as stats_mod
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch

from .allocate import DENSE, Matrix, total_params
from .arch import arch_for
from .calibrate import FisherStats, InputStats, Statistics
from .corpora import CORPORA, split_docs
from .data import DEFAULT_CALIB, DEFAULT_EVAL, DEFAULT_SEARCH, eval_windows, sample_windows
from .errors import VacError
from .evaluate import perplexity
from .factorize import decompose, tail_energy, weighting
from .layers import factorize_, max_useful_rank
from .pipeline import (
    ORDERS,
    VAC_ATTN_SHARE,
    VacConfig,
    _component_knapsacks,
    _component_ratios,
    _depth_knapsacks,
    allocate,
    attn_ratio_of,
    check_budget,
    compress,
    dense_statistics,
    layer_order,
    matrices_of,
)

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
EXPONENTS = (0.25, 1 / 3, 0.5, 2 / 3, 1.0)
ATTN_SHARES = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)  # attn_ratio = 1 + (ratio − 1) · share
ALLOCATIONS = ("uniform", "depth", "global")  # type weights matter to "global" only
LOG_WEIGHT_MAX = 2.0  # type weights are 2^w, w on a grid of 0.5 within ±LOG_WEIGHT_MAX
SEARCH_METHODS = ("vac", "whiten")
DEFAULT_EXPONENT = VacConfig().fisher_exponent
DEFAULT_ORDER = VacConfig().order
DEFAULT_ALLOCATION = VacConfig().allocation
DATA_FIELDS = ("calib", "calib_windows", "fisher_windows", "seq_len", "seed", "batch_size")
STRATEGY_FIELDS = tuple(f.name for f in fields(VacConfig) if f.name not in DATA_FIELDS)
FORMAT = "vac-strategy/1"


# ----------------------------------------------------------------------------- genome


@dataclass(frozen=True)
class Genome:
    order: tuple[int, ...]
    method: str = "vac"
    exponent: float = DEFAULT_EXPONENT
    attn: float = VAC_ATTN_SHARE  # attention split share (see pipeline.attn_ratio_of; 1: no split)
    allocation: str = DEFAULT_ALLOCATION  # see pipeline.ALLOCATIONS
    log_weights: tuple[float, ...] = (0.0,) * len(KINDS)  # log2 of the curve weight of q, k, …, down

    @classmethod
    def default(cls, n_layers: int) -> "Genome":
        """The default VacConfig: vac, its default order, exponent, split and uniform ranks."""
        return cls(tuple(layer_order(DEFAULT_ORDER, n_layers)))

    def proxy_key(self) -> str:
        """Identity under the proxy (which is blind to the layer order; whiten ignores the exponent,
        only the global knapsack uses the curve weights)."""
        weights = list(self.log_weights) if self.allocation == "global" else None
        return json.dumps([self.method, self.exponent if self.method == "vac" else None, self.attn,
                           self.allocation, weights])

    def full_key(self) -> str:
        return json.dumps([json.loads(self.proxy_key()), list(self.order)])

    def order_name(self) -> str | None:
        n = len(self.order)
        return next((o for o in ORDERS if tuple(layer_order(o, n)) == self.order), None)

    def type_weights(self) -> dict[str, float] | None:
        weights = {k: 2.0 ** w for k, w in zip(KINDS, self.log_weights) if w != 0}
        return weights or None

    def config(self, ratio: float, *, full: bool, **data) -> VacConfig:
        """The VacConfig of this genome; ``full``: sequential, as `vac compress` (else the non-sequential proxy)."""
        return VacConfig(
            ratio=ratio, method=self.method, allocation=self.allocation, sequential=full,
            order=self.order_name() or list(self.order),
            fisher_exponent=self.exponent if self.method == "vac" else DEFAULT_EXPONENT,
            type_weights=self.type_weights() if self.allocation == "global" else None,
            attn_ratio=attn_ratio_of(ratio, self.attn),
            **data,
        )

    def describe(self) -> dict[str, str]:
        order = self.order_name() or "perm " + ",".join(map(str, self.order))
        weights = " ".join(f"{k}×{2.0 ** w:.2g}" for k, w in zip(KINDS, self.log_weights) if w != 0)
        weights = weights if self.allocation == "global" else ""
        return {
            "method": self.method,
            "exponent": _frac(self.exponent) if self.method == "vac" else "-",
            "split": f"attn×{self.attn:g}",
            "allocation": self.allocation,
            "weights": weights or "-",
            "order": order,
        }

    def to_dict(self) -> dict:
        return {"order": list(self.order), "method": self.method, "exponent": self.exponent,
                "attn": self.attn, "allocation": self.allocation, "log_weights": list(self.log_weights)}

    @classmethod
    def from_dict(cls, d: dict) -> "Genome":
        return cls(tuple(int(i) for i in d["order"]), d["method"], float(d["exponent"]), float(d["attn"]),
                   d["allocation"], tuple(float(w) for w in d["log_weights"]))


def _frac(x: float) -> str:
    for num, den in ((1, 4), (1, 3), (1, 2), (2, 3), (1, 1)):
        if abs(x - num / den) < 1e-12:
            return f"{num}/{den}" if den != 1 else "1"
    return f"{x:g}"


class Space:
    """Random genomes, mutation and crossover over the genes (deterministic given the RNG)."""

    def __init__(self, n_layers: int, methods=SEARCH_METHODS, shares=ATTN_SHARES):
        self.n_layers, self.methods, self.shares = n_layers, tuple(methods), tuple(shares)

    def random(self, rng: random.Random) -> Genome:
        """A random genome; half keep the default method and exponent (each new (method, exponent)
        costs one SVD of every matrix, minutes on a CPU), the other genes vary freely."""
        method = rng.choice(self.methods) if len(self.methods) > 1 and rng.random() < 0.5 else self.methods[0]
        exponent = DEFAULT_EXPONENT if rng.random() < 0.5 else rng.choice(EXPONENTS)
        attn = rng.choice(self.shares)
        allocation = rng.choice(ALLOCATIONS)
        weights = tuple(rng.choice((-1.0, -0.5, 0.0, 0.0, 0.0, 0.5, 1.0)) for _ in KINDS)
        order = tuple(layer_order(rng.choice(ORDERS), self.n_layers))
        return Genome(order, method, exponent, attn, allocation, weights)

    def mutate(self, g: Genome, rng: random.Random) -> Genome:
        ops = ["exponent", "attn", "allocation", "weight", "weight", "order"]
        ops += ["method"] if len(self.methods) > 1 else []
        for _ in range(1 + (rng.random() < 0.3)):
            op = rng.choice(ops)
            if op == "method":
                g = replace(g, method=rng.choice([m for m in self.methods if m != g.method]))
            elif op == "exponent":
                i = min(range(len(EXPONENTS)), key=lambda j: abs(EXPONENTS[j] - g.exponent))
                i = rng.randrange(len(EXPONENTS)) if rng.random() < 0.25 else i + rng.choice((-1, 1))
                g = replace(g, exponent=EXPONENTS[min(max(i, 0), len(EXPONENTS) - 1)])
            elif op == "attn":
                options = self.shares
                i = min(range(len(options)), key=lambda j: abs(options[j] - g.attn))
                i = rng.randrange(len(options)) if rng.random() < 0.3 else i + rng.choice((-1, 1))
                g = replace(g, attn=options[min(max(i, 0), len(options) - 1)])
            elif op == "allocation":
                g = replace(g, allocation=rng.choice([a for a in ALLOCATIONS if a != g.allocation]))
            elif op == "weight":
                k = rng.randrange(len(KINDS))
                w = list(g.log_weights)
                w[k] = min(max(w[k] + rng.choice((-0.5, 0.5)), -LOG_WEIGHT_MAX), LOG_WEIGHT_MAX)
                g = replace(g, log_weights=tuple(w))
            else:
                g = replace(g, order=self._mutate_order(g.order, rng))
        return g

    def _mutate_order(self, order: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
        n, r = len(order), rng.random()
        if n < 2 or r >= 0.8:
            return tuple(layer_order(rng.choice(ORDERS), self.n_layers))
        a, b = sorted(rng.sample(range(n), 2))
        o = list(order)
        if r < 0.4:  # swap two positions
            o[a], o[b] = o[b], o[a]
        else:  # reverse a segment
            o[a: b + 1] = reversed(o[a: b + 1])
        return tuple(o)

    def crossover(self, a: Genome, b: Genome, rng: random.Random) -> Genome:
        pick = lambda x, y: x if rng.random() < 0.5 else y  # noqa: E731
        donor = pick(a, b)
        return Genome(
            order=pick(a, b).order, method=donor.method, exponent=donor.exponent, attn=pick(a, b).attn,
            allocation=pick(a, b).allocation,
            log_weights=tuple(pick(x, y) for x, y in zip(a.log_weights, b.log_weights)),
        )

    def initial(self, rng: random.Random, size: int, key: Callable[[Genome], str]) -> list[Genome]:
        """The default genome and ``size − 1`` random ones (distinct keys where possible)."""
        pop = [Genome.default(self.n_layers)]
        seen = {key(pop[0])}
        while len(pop) < size:
            for _ in range(50):
                g = self.random(rng)
                if key(g) not in seen:
                    break
            pop.append(g)
            seen.add(key(g))
        return pop

    def breed(self, pop: list[Genome], scores: list[float], rng: random.Random, size: int,
              key: Callable[[Genome], str], known: set[str]) -> list[Genome]:
        """Next population: the best quarter kept, the rest from tournament parents, crossover and
        mutation; children not scored before are preferred (up to 20 tries each)."""
        ranked = sorted(range(len(pop)), key=lambda i: (scores[i], pop[i].full_key()))
        new = [pop[i] for i in ranked[: max(1, size // 4)]]
        seen = {key(g) for g in new}

        def tournament() -> Genome:
            i, j = rng.randrange(len(pop)), rng.randrange(len(pop))
            return pop[min((i, j), key=lambda k: (scores[k], pop[k].full_key()))]

        while len(new) < size:
            for _ in range(20):
                a = tournament()
                child = self.crossover(a, tournament(), rng) if rng.random() < 0.7 else a
                child = self.mutate(child, rng)
                if key(child) not in known and key(child) not in seen:
                    break
            new.append(child)
            seen.add(key(child))
        return new


# ----------------------------------------------------------------------------- data sources


def source_units(spec: str) -> dict[str, str]:
    """The documents a data spec reads, as comparable ids: ``corpus/doc`` for built-in corpora (from
    ``corpora.SPLIT_DOCS``, without loading them), ``file:`` path and ``sha256:`` content for local
    files, the spec itself for ``hf:`` sources. Maps id → a human-readable label."""
    units: dict[str, str] = {}
    parts = [spec] if Path(spec).exists() else [p.strip() for p in spec.split("+") if p.strip()]
    for part in parts:
        name, sep, split = part.partition(":")
        if name in CORPORA:
            for doc in split_docs(name, split if sep else None):
                units[f"{name}/{doc}"] = f"{name}/{doc}"
        elif Path(part).exists():
            root = Path(part).resolve()
            files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
            for f in files:
                units[f"file:{f}"] = str(f)
                units["sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()] = f"{f} (by content)"
        else:
            units[part] = part
    return units


def check_sources(calib: str, search: str, evaluation: str | None) -> None:
    """Raise a one-line VacError if the search documents overlap the evaluation or calibration
    documents, or calibration overlaps evaluation."""
    pairs = [("search", search, "evaluation", evaluation, "--search-data"),
             ("search", search, "calibration", calib, "--search-data"),
             ("calibration", calib, "evaluation", evaluation, "--calib")]
    for a, spec_a, b, spec_b, option in pairs:
        if not spec_a or not spec_b:
            continue
        ua, ub = source_units(spec_a), source_units(spec_b)
        common = [ua[u] for u in ua if u in ub]
        if common:
            raise VacError(
                f"{a} data '{spec_a}' overlaps the {b} data '{spec_b}' ({len(common)} shared documents, "
                f"e.g. {common[0]}); choose a disjoint {option} (the default search split is {DEFAULT_SEARCH})"
            )


# ----------------------------------------------------------------------------- setup, budget


@dataclass
class SearchSetup:
    """Everything that decides a search's result (the run length, clock and workers do not)."""

    model: str = "smollm2-135m"
    ratio: float = 1.8
    population: int = 8
    seed: int = 0
    search_data: str = DEFAULT_SEARCH
    search_windows: int = 8
    eval_data: str = DEFAULT_EVAL
    eval_windows: int = 40
    calib: str = DEFAULT_CALIB
    calib_windows: int = 64
    fisher_windows: int = 16
    seq_len: int = 512
    rank_step: int = 8
    rank_floor: int = 8
    top_k: int = 3
    proxy: bool = True
    methods: tuple[str, ...] = SEARCH_METHODS

    def __post_init__(self):
        self.methods = tuple(self.methods)
        if not self.ratio > 1:
            raise VacError(f"--ratio must be greater than 1, got {self.ratio:g}")
        for name in ("population", "search_windows", "calib_windows", "fisher_windows", "top_k",
                     "rank_step", "rank_floor"):
            if getattr(self, name) < 1:
                raise VacError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.population < 2:
            raise VacError(f"--population must be at least 2, got {self.population}")
        bad = [m for m in self.methods if m not in SEARCH_METHODS] or ([] if self.methods else ["(none)"])
        if bad:
            raise VacError(f"search methods must be among {', '.join(SEARCH_METHODS)}, got {bad[0]}")

    def data(self) -> dict:
        """The VacConfig fields every genome shares (calibration sampling seed 0, as `vac compress`)."""
        return {"calib": self.calib, "calib_windows": self.calib_windows,
                "fisher_windows": self.fisher_windows, "seq_len": self.seq_len,
                "rank_step": self.rank_step, "rank_floor": self.rank_floor}

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def memo_key(self, g: Genome) -> str:
        return g.proxy_key() if self.proxy else g.full_key()


def max_step(matrices: list[Matrix], step: int, floor: int) -> int:
    """The largest parameter cost of moving one matrix to its next choice (a rank step or dense)."""
    worst = 0
    for m in matrices:
        costs = [m.params(r) for r in m.choices(step, floor)]
        worst = max(worst, max((b - a for a, b in zip(costs, costs[1:])), default=0))
    return worst


def assert_budget(params_before: int, params_after: int, cfg: VacConfig, step_cost: int) -> None:
    """A rank map never holds more than ``params_before / ratio`` parameters and, from the knapsack
    (``cfg.allocation == "global"``), less than one rank step per knapsack below it: no strategy wins
    by compressing less (uniform ranks round every matrix down, so they can only lose)."""
    budget = params_before / cfg.ratio
    if params_after > budget:
        raise AssertionError(f"rank map holds {params_after:,} parameters, over the budget of "
                             f"{budget:,.0f} at ratio {cfg.ratio:g}")
    knapsacks = 2 if (cfg.attn_ratio or cfg.mlp_ratio) else 1  # one per component
    if cfg.allocation == "global" and budget - params_after > knapsacks * step_cost + knapsacks:
        raise AssertionError(f"rank map holds {params_after:,} parameters, more than "
                             f"{knapsacks} rank step(s) ({step_cost:,}) below the budget of {budget:,.0f}")


def feasible_shares(model, setup: SearchSetup) -> tuple[float, ...]:
    """The attention split shares whose component budgets can be met at ``setup.ratio``."""
    arch, result = arch_for(model), []
    for share in ATTN_SHARES:
        cfg = VacConfig(ratio=setup.ratio, attn_ratio=attn_ratio_of(setup.ratio, share), **setup.data())
        matrices = matrices_of(model)
        try:
            ratios = _component_ratios(model, matrices, cfg)
        except VacError:
            continue
        ok = True
        for comp, ratio in ratios.items():
            part = [m for m in matrices if arch.component(m.path) == comp]
            floor = sum(min(m.params(r) for r in m.choices(cfg.rank_step, cfg.rank_floor)) for m in part)
            ok &= ratio > 1 and floor <= int(sum(m.dense_params for m in part) / ratio)
        if ok:
            result.append(share)
    return tuple(result)


def component_ratios(model, ranks: dict[str, int]) -> dict[str, float]:
    """Reached ratio of the attention and MLP linears for a rank map (missing/0 = dense)."""
    arch, result = arch_for(model), {}
    matrices = matrices_of(model)
    for comp in ("attn", "mlp"):
        part = [m for m in matrices if arch.component(m.path) == comp]
        result[comp] = sum(m.dense_params for m in part) / sum(m.params(ranks.get(m.path, DENSE)) for m in part)
    return result


# ----------------------------------------------------------------------------- caches


def _atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    (tmp.write_bytes if isinstance(data, bytes) else tmp.write_text)(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, json.dumps(obj, indent=1))


def statistics_key(setup: SearchSetup) -> str:
    """Hash of what the dense statistics depend on (the folder name of the caches in OUT/cache)."""
    what = [setup.model, setup.calib, setup.calib_windows, setup.fisher_windows, setup.seq_len, 0,
            VacConfig().batch_size]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def _pack_inputs(inputs: dict[str, InputStats]) -> dict:
    leaders, members, seen = {}, {}, {}
    for path, s in inputs.items():
        leader = seen.setdefault(id(s), path)
        members[path] = leader
        if leader == path:
            leaders[path] = {"xtx": s.xtx, "abs_sum": s.abs_sum, "tokens": s.tokens, "cross": s.cross}
    return {"leaders": leaders, "members": members}


def _unpack_inputs(packed: dict) -> dict[str, InputStats]:
    leaders = {p: InputStats(d["xtx"], d["abs_sum"], d["tokens"], d["cross"]) for p, d in packed["leaders"].items()}
    return {p: leaders[leader] for p, leader in packed["members"].items()}


def cached_statistics(model, calib: torch.Tensor, setup: SearchSetup, folder: Path,
                      progress: bool = True) -> tuple[Statistics, Statistics]:
    """(proxy, sequential) dense statistics, computed once and cached in ``folder``.

    ``sequential``: exactly what ``compress`` computes for a sequential vac config (Fisher over the
    first ``fisher_windows`` windows, with the input statistics of those windows); ``proxy``: the same
    Fisher with input statistics over all calibration windows (what a non-sequential vac uses)."""
    path = folder / "statistics.pt"
    if path.is_file():
        packed = torch.load(path, weights_only=True)
        fisher = {p: FisherStats(d["row"], d["col"], d["windows"]) for p, d in packed["fisher"].items()}
        return (Statistics(_unpack_inputs(packed["proxy"]), fisher),
                Statistics(_unpack_inputs(packed["sequential"]), fisher))
    data = setup.data()
    seq = dense_statistics(model, calib, VacConfig(ratio=setup.ratio, method="vac", sequential=True, **data), progress)
    inputs = dense_statistics(model, calib, VacConfig(ratio=setup.ratio, method="whiten", sequential=False,
                                                      **data), progress).inputs
    proxy = Statistics(inputs, seq.fisher)
    packed = {"proxy": _pack_inputs(proxy.inputs), "sequential": _pack_inputs(seq.inputs),
              "fisher": {p: {"row": f.row, "col": f.col, "windows": f.windows} for p, f in seq.fisher.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(packed, tmp)
    os.replace(tmp, path)
    return proxy, seq


class FactorCache:
    """Weighted SVD factors of every matrix per (method, exponent), at the largest useful rank: a rank
    ``r`` factorization is ``up[:, :r] @ down[:r]``, the same as factorizing at rank ``r``. Kept on
    disk (safetensors) and the last ``keep`` sets in memory; spectra of all sets in memory."""

    def __init__(self, folder: Path, model, stats: Statistics | None = None, keep: int = 2,
                 asvd_alpha: float = 0.5):
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

            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            save_file(flat, str(tmp))
            os.replace(tmp, path)
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
            w = weighting(method, self.stats.inputs.get(m.path), self.stats.fisher.get(m.path), exponent,
                          self.asvd_alpha)
            weight = self.model.get_submodule(m.path).weight
            u, s, vh = decompose(weight, w)
            self.svds += 1
            up, down = w.factors(u, s, vh, max_useful_rank(m.out_features, m.in_features))
            flat[f"{m.path}|up"] = up.float().contiguous()
            flat[f"{m.path}|down"] = down.float().contiguous()
            # the allocation curve exactly as pipeline.allocate computes it (svdvals, not the SVD's s)
            flat[f"{m.path}|s"] = torch.linalg.svdvals(w.apply(weight)).contiguous()
        return flat


def _finite(x: float) -> float:
    return x if math.isfinite(x) else float("inf")


class ProxyScorer:
    """Scores genomes under the proxy: knapsack over cached spectra, truncation of cached factors
    (no sequential statistics), perplexity on the search windows."""

    def __init__(self, model, windows: torch.Tensor, setup: SearchSetup, factors: FactorCache):
        self.model, self.windows, self.setup, self.factors = model, windows, setup, factors
        self.arch = arch_for(model)
        self.matrices = matrices_of(model)
        self.step_cost = max_step(self.matrices, setup.rank_step, setup.rank_floor)

    def allocation(self, genome: Genome) -> tuple[VacConfig, dict[str, int]]:
        cfg = genome.config(self.setup.ratio, full=False, **self.setup.data())
        if cfg.allocation == "uniform":
            ranks = allocate(self.model, Statistics(), cfg)
            assert_budget(sum(m.dense_params for m in self.matrices), total_params(self.matrices, ranks), cfg,
                          self.step_cost)
            return cfg, ranks
        spectra = self.factors.spectra(genome.method, genome.exponent)
        weights = cfg.type_weights or {}
        matrices = [Matrix(m.path, m.out_features, m.in_features) for m in self.matrices]
        for m in matrices:
            m.curve = tail_energy(spectra[m.path]) * weights.get(self.arch.kind(m.path), 1.0)
        knapsacks = _depth_knapsacks if cfg.allocation == "depth" else _component_knapsacks
        ranks = knapsacks(self.model, matrices, cfg)
        assert_budget(sum(m.dense_params for m in matrices), total_params(matrices, ranks), cfg, self.step_cost)
        return cfg, ranks

    def compressed(self, genome: Genome):
        """A compressed copy of the model under the proxy, and its rank map."""
        _, ranks = self.allocation(genome)
        factors = self.factors.get(genome.method, genome.exponent)
        net = copy.deepcopy(self.model)
        factorize_(net, {p: r for p, r in ranks.items() if r != DENSE},
                   lambda path, _w, r: (factors[path][0][:, :r], factors[path][1][:r]))
        return net, ranks

    def score(self, genome: Genome) -> dict:
        t0 = time.perf_counter()
        net, ranks = self.compressed(genome)
        ppl = perplexity(net, self.windows, progress=False)["ppl"]
        after = total_params(self.matrices, ranks)
        return {"score": _finite(ppl), "params_after": after,
                "ratio_reached": sum(m.dense_params for m in self.matrices) / after,
                "seconds": time.perf_counter() - t0}


_WORKER: dict = {}


def _worker_init(model_spec: str, windows: torch.Tensor, setup_json: dict, folder: str, threads: int):
    from .zoo import load_model

    torch.set_num_threads(threads)
    model, _ = load_model(model_spec)
    setup = SearchSetup(**setup_json)
    _WORKER["scorer"] = ProxyScorer(model, windows, setup, FactorCache(Path(folder), model))


def _worker_score(genome: dict) -> dict:
    return _WORKER["scorer"].score(Genome.from_dict(genome))


def full_compress(model, calib: torch.Tensor, stats: Statistics, cfg: VacConfig, step_cost: int):
    """A compressed copy of ``model`` under ``cfg`` (what ``vac compress`` does) and its Result."""
    net = copy.deepcopy(model)
    result = compress(net, calib, cfg, progress=False, stats=stats)
    assert_budget(result.params_before, result.params_after, cfg, step_cost)
    return net, result


# ----------------------------------------------------------------------------- the search


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rng_state(rng: random.Random):
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from(state) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


class _Run:
    """One search session over an output folder (state loaded from / saved to ``state.json``)."""

    def __init__(self, setup: SearchSetup, out: Path, workers: int, progress: bool, log):
        from .zoo import load_model

        self.setup, self.out, self.workers, self.progress, self.log = setup, Path(out), workers, progress, log
        self.started = time.monotonic()
        self.state = self._read_state()
        self.base_elapsed = self.state["elapsed_s"] if self.state else 0.0
        self.model, tok = load_model(setup.model)
        if tok is None:
            raise VacError(f"{setup.model} has no tokenizer")
        self.n_layers = len(self.model.get_submodule(arch_for(self.model).layers))
        self.default = Genome.default(self.n_layers)
        check_budget(self.model, self.default.config(setup.ratio, full=True, **setup.data()))
        self.calib = sample_windows(tok, setup.calib, setup.seq_len, setup.calib_windows, seed=0)
        self.search_windows = eval_windows(tok, setup.search_data, setup.seq_len, setup.search_windows)
        self.eval_windows = (eval_windows(tok, setup.eval_data, setup.seq_len, setup.eval_windows)
                             if setup.eval_data else None)
        self.cache = self.out / "cache" / statistics_key(setup)
        self.proxy_stats, self.seq_stats = cached_statistics(self.model, self.calib, setup, self.cache, progress)
        self.factors = FactorCache(self.cache, self.model, self.proxy_stats)
        self.scorer = ProxyScorer(self.model, self.search_windows, setup, self.factors)
        self.space = Space(self.n_layers, setup.methods, feasible_shares(self.model, setup))
        self.models: dict[str, torch.nn.Module] = {}  # compressed full models kept for the eval scoring
        self.pool = None

    # state ---------------------------------------------------------------------------------------
    def _read_state(self) -> dict | None:
        path = self.out / "state.json"
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except ValueError:
            raise VacError(f"{path} is not valid JSON; delete it to start the search again") from None
        if state.get("setup") != self.setup.to_json():
            theirs = state.get("setup") or {}
            diff = [k for k in self.setup.to_json() if theirs.get(k) != self.setup.to_json()[k]]
            raise VacError(f"{self.out} holds a search with other settings ({', '.join(diff) or 'format'}); "
                           "use another --out or the same options to resume it")
        return state

    def elapsed(self) -> float:
        return self.base_elapsed + time.monotonic() - self.started

    def save(self) -> None:
        self.state["elapsed_s"] = self.elapsed()
        _write_json(self.out / "state.json", self.state)

    def key(self, g: Genome) -> str:
        return self.setup.memo_key(g)

    # scoring -------------------------------------------------------------------------------------
    def full_entry(self, g: Genome, keep: bool = False) -> dict:
        """Full-config score of ``g`` on the search split (memoized in the state)."""
        key = g.full_key()
        if key in self.state["full"]:
            return self.state["full"][key]
        t0 = time.perf_counter()
        cfg = g.config(self.setup.ratio, full=True, **self.setup.data())
        net, result = full_compress(self.model, self.calib, self.seq_stats, cfg, self.scorer.step_cost)
        t1 = time.perf_counter()
        ppl = perplexity(net, self.search_windows, progress=False)["ppl"]
        t2 = time.perf_counter()
        entry = {"genome": g.to_dict(), "score": _finite(ppl), "params_after": result.params_after,
                 "ratio_reached": result.ratio, "seconds": t2 - t0}
        self.state["full"][key] = entry
        self.state["timing"].setdefault("full_compress_s", t1 - t0)
        self.state["timing"].setdefault("search_ppl_s", t2 - t1)
        if keep:
            self.models[key] = net
        self.save()
        return entry

    def evaluate(self, pop: list[Genome], generation: int) -> int:
        """Fitness of every genome of ``pop`` not scored before (memo by key); returns how many."""
        archive, todo = self.state["archive"], {}
        for g in pop:
            if self.key(g) not in archive:
                todo.setdefault(self.key(g), g)
        genomes = sorted(todo.values(), key=lambda g: (g.method, g.exponent))  # cache locality only
        if not self.setup.proxy:
            for g in genomes:
                entry = self.full_entry(g)
                archive[self.key(g)] = dict(entry, generation=generation)
                self.save()
            return len(genomes)
        if self.workers > 1 and len(genomes) > 1:
            for g in genomes:
                self.factors.get(g.method, g.exponent)  # on disk before the workers read them
            results = self._pool().map(_worker_score, [g.to_dict() for g in genomes])
        else:
            results = (self.scorer.score(g) for g in genomes)
        for g, result in zip(genomes, results):
            archive[self.key(g)] = dict(result, genome=g.to_dict(), generation=generation)
            self.save()
        return len(genomes)

    def _pool(self):
        if self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            threads = max(1, (os.cpu_count() or 1) // self.workers)
            self.pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                initargs=(self.setup.model, self.search_windows, self.setup.to_json(), str(self.cache), threads),
            )
        return self.pool

    def reserve_s(self) -> float:
        """Estimated seconds of the final stage (top-k full re-scores, two eval scorings)."""
        t = self.state["timing"]
        full = t.get("full_compress_s", 0.0) + t.get("search_ppl_s", 0.0)
        eval_s = t.get("search_ppl_s", 0.0) * (self.setup.eval_windows / self.setup.search_windows
                                               if self.setup.eval_data else 0)
        return (self.setup.top_k if self.setup.proxy else 1) * full + 2 * eval_s

    # the run -------------------------------------------------------------------------------------
    def run(self, generations: int, budget_minutes: float | None) -> dict:
        setup = self.setup
        if self.state is None:
            rng = random.Random(setup.seed)
            pop = self.space.initial(rng, setup.population, self.key)
            self.state = {"format": 1, "setup": setup.to_json(), "generation": 0,
                          "population": [g.to_dict() for g in pop], "rng": _rng_state(rng),
                          "archive": {}, "full": {}, "eval": {}, "history": [], "elapsed_s": self.elapsed(),
                          "timing": {}, "stopped": None}
            self.save()
        self.log(f"search: {setup.model} at {setup.ratio:g}x, fitness on {setup.search_data} "
                 f"({setup.search_windows}x{setup.seq_len}, {'proxy: non-sequential' if setup.proxy else 'full'}), "
                 f"starting at generation {self.state['generation']}")
        default = self.full_entry(self.default, keep=True)  # the reference, and a measured full cost
        self.log(f"default strategy (full config): search PPL {default['score']:.3f}")
        try:
            self._generations(generations, budget_minutes)
        finally:
            if self.pool is not None:
                self.pool.shutdown()
        return self._final()

    def _generations(self, generations: int, budget_minutes: float | None) -> None:
        state, setup = self.state, self.setup
        state["stopped"] = None
        while state["generation"] < generations:
            if budget_minutes is not None:
                last = state["history"][-1]["seconds"] if state["history"] else 0.0
                if self.elapsed() + last + self.reserve_s() > budget_minutes * 60:
                    state["stopped"] = "budget"
                    self.log(f"budget of {budget_minutes:g} min reached after {state['generation']} generations")
                    break
            t0 = time.perf_counter()
            gen = state["generation"]
            pop = [Genome.from_dict(d) for d in state["population"]]
            self.evaluate(pop, gen)
            new = sum(e["generation"] == gen for e in state["archive"].values())  # same after a resume
            scores = [state["archive"][self.key(g)]["score"] for g in pop]
            state["history"].append({"generation": gen, "best": min(scores),
                                     "median": stats_mod.median(scores), "evaluated": new,
                                     "seconds": time.perf_counter() - t0})
            rng = _rng_from(state["rng"])
            nxt = self.space.breed(pop, scores, rng, setup.population, self.key, set(state["archive"]))
            state["population"] = [g.to_dict() for g in nxt]
            state["rng"] = _rng_state(rng)
            state["generation"] = gen + 1
            self.save()
            self.log(f"generation {gen + 1}/{generations}: best {min(scores):.3f}, median "
                     f"{stats_mod.median(scores):.3f} ({new} scored, {time.perf_counter() - t0:.0f} s, "
                     f"{self.elapsed() / 60:.1f} min in all)")
        if state["stopped"] is None:
            state["stopped"] = "generations"
        self.save()

    def ranked(self) -> list[dict]:
        return sorted(self.state["archive"].values(),
                      key=lambda e: (e["score"], Genome.from_dict(e["genome"]).full_key()))

    def _final(self) -> dict:
        state, setup = self.state, self.setup
        ranked = self.ranked()
        candidates = [Genome.from_dict(e["genome"]) for e in ranked[: setup.top_k]]
        if self.default.full_key() not in {g.full_key() for g in candidates}:
            candidates.append(self.default)
        best_key, best = None, None
        for g in candidates:
            entry = self.full_entry(g, keep=True)
            if best is None or entry["score"] < best["score"]:
                best_key, best = g.full_key(), entry
            self.models = {k: m for k, m in self.models.items() if k in (best_key, self.default.full_key())}
            self.log(f"full re-score {g.describe()}: search PPL {entry['score']:.3f}")
        winner = Genome.from_dict(best["genome"])
        for g in dict.fromkeys([winner, self.default]):
            if self.eval_windows is not None and g.full_key() not in state["eval"]:
                net = self.models.get(g.full_key())
                if net is None:
                    cfg = g.config(setup.ratio, full=True, **setup.data())
                    net, _ = full_compress(self.model, self.calib, self.seq_stats, cfg, self.scorer.step_cost)
                state["eval"][g.full_key()] = perplexity(net, self.eval_windows, progress=False)["ppl"]
                self.save()
        self.models.clear()
        return self._write_outputs(winner, candidates)

    def _write_outputs(self, winner: Genome, candidates: list[Genome]) -> dict:
        state, setup = self.state, self.setup
        cfg = winner.config(setup.ratio, full=True, **setup.data())
        full, ev = state["full"], state["eval"]
        default_key, winner_key = self.default.full_key(), winner.full_key()
        rows = []
        for e in self.ranked():
            g = Genome.from_dict(e["genome"])
            rows.append({"genome": e["genome"], "describe": g.describe(), "fitness": e["score"],
                         "full_search_ppl": full.get(g.full_key(), {}).get("score"),
                         "generation": e.get("generation"), "default": g.full_key() == default_key})
        ratio = full[winner_key]["ratio_reached"]
        cli = (f"vac compress {setup.model} --strategy {self.out / 'strategy.json'} --out OUT --calib "
               f"'{setup.calib}' --calib-windows {setup.calib_windows} --fisher-windows {setup.fisher_windows} "
               f"--seq-len {setup.seq_len}" + (f" --eval '{setup.eval_data}' --eval-windows {setup.eval_windows}"
                                              if setup.eval_data else " --eval ''"))
        summary = {
            "setup": setup.to_json(), "generations_done": state["generation"], "stopped": state["stopped"],
            "minutes": self.elapsed() / 60, "fitness": "proxy: sequential=False" if setup.proxy else "full config",
            "protocol": f"PPL over non-overlapping windows of {setup.seq_len} tokens, all shifted tokens scored, "
                        f"use_cache=False; search: first {setup.search_windows} windows of {setup.search_data}; "
                        f"eval: first {setup.eval_windows} windows of {setup.eval_data or '(skipped)'}",
            "winner": {"genome": winner.to_dict(), "describe": winner.describe(), "config": cfg.to_dict(),
                       "search_ppl": full[winner_key]["score"], "eval_ppl": ev.get(winner_key),
                       "ratio_reached": ratio, "is_default": winner_key == default_key},
            "default": {"search_ppl": full[default_key]["score"], "eval_ppl": ev.get(default_key),
                        "proxy_fitness": state["archive"].get(self.key(self.default), {}).get("score"),
                        "ratio_reached": full[default_key]["ratio_reached"]},
            "final_candidates": [{"describe": g.describe(), "genome": g.to_dict(),
                                  "search_ppl": full[g.full_key()]["score"]} for g in candidates],
            "history": state["history"], "top": rows[:20], "evaluated": len(rows),
            "reproduce": cli,
        }
        strategy = {"format": FORMAT, "config": cfg.to_dict(),
                    "search": {k: summary[k] for k in ("protocol", "fitness", "generations_done", "minutes")}
                    | {"model": setup.model, "ratio_reached": ratio, "search_ppl": summary["winner"]["search_ppl"],
                       "eval_ppl": summary["winner"]["eval_ppl"], "default": summary["default"],
                       "reproduce": cli}}
        _write_json(self.out / "strategy.json", strategy)
        _write_json(self.out / "search.json", summary)
        _atomic_write(self.out / "fitness.png", fitness_png(summary))
        return summary


def run_search(setup: SearchSetup, out: Path | str, generations: int = 10, budget_minutes: float | None = None,
               workers: int = 1, progress: bool = True, log: Callable[[str], None] = _stderr) -> dict:
    """Run (or resume) the search in ``out``; returns the summary also written to ``out/search.json``."""
    if generations < 1:
        raise VacError(f"--generations must be at least 1, got {generations}")
    if workers < 1:
        raise VacError(f"--workers must be at least 1, got {workers}")
    if budget_minutes is not None and not budget_minutes > 0:
        raise VacError(f"--budget-minutes must be positive, got {budget_minutes:g}")
    check_sources(setup.calib, setup.search_data, setup.eval_data)
    Path(out).mkdir(parents=True, exist_ok=True)
    return _Run(setup, Path(out), workers, progress, log).run(generations, budget_minutes)


# ----------------------------------------------------------------------------- strategy files


def load_strategy(path: Path | str) -> dict:
    """The VacConfig fields of a strategy file written by ``vac search`` (the strategy: ratio, method,
    order, exponent, type weights, budget split, rank grid; the data options are left to the caller)."""
    path = Path(path)
    if not path.is_file():
        raise VacError(f"no such strategy file: {path}")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise VacError(f"strategy file {path} is not valid JSON") from None
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict):
        raise VacError(f"{path} is not a vac strategy file (no 'config' object)")
    unknown = sorted(set(config) - {f.name for f in fields(VacConfig)})
    if unknown:
        raise VacError(f"strategy file {path} has unknown fields: {', '.join(unknown)}")
    result = {k: config[k] for k in STRATEGY_FIELDS if k in config}
    try:
        VacConfig(**result)
    except (TypeError, ValueError) as exc:
        raise VacError(f"strategy file {path} is invalid: {exc}") from None
    return result


# ----------------------------------------------------------------------------- reports


def fitness_png(summary: dict) -> bytes:
    """PNG of the best and median fitness per generation (and the default's proxy fitness)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = summary["history"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [h["generation"] for h in hist]
    ax.plot(xs, [h["best"] for h in hist], marker="o", label="best")
    ax.plot(xs, [h["median"] for h in hist], marker=".", ls="--", label="median")
    if summary["default"].get("proxy_fitness") is not None:
        ax.axhline(summary["default"]["proxy_fitness"], color="grey", ls=":", label="default")
    s = summary["setup"]
    ax.set_xlabel("generation")
    ax.set_ylabel(f"PPL on {s['search_data']} ({summary['fitness'].split(':')[0]})")
    ax.set_title(f"{Path(s['model']).name} at {s['ratio']:g}x", fontsize=9)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def top_table(summary: dict, n: int = 10):
    """A rich table of the best genomes by fitness."""
    from rich.table import Table

    table = Table(title=f"top genomes ({summary['evaluated']} scored, fitness: {summary['fitness']})",
                  show_edge=False)
    for col in ("#", "method", "exp", "split", "allocation", "type weights", "order", "fitness", "full"):
        table.add_column(col, justify="right" if col in ("#", "fitness", "full") else "left")
    for i, row in enumerate(summary["top"][:n], 1):
        d = row["describe"]
        full = row["full_search_ppl"]
        table.add_row(str(i) + ("*" if row["default"] else ""), d["method"], d["exponent"], d["split"],
                      d["allocation"], d["weights"], d["order"], f"{row['fitness']:.3f}", "-" if full is None else f"{full:.3f}")
    return table


# ----------------------------------------------------------------------------- ablation


def ablation_rows(ratio: float) -> list[tuple[str, str, dict]]:
    """(study, setting, VacConfig overrides of the default): VAC's published kind of ablation."""
    return [
        ("order", "front-to-back", {"order": "front-to-back"}), ("order", "back-to-front", {"order": "back-to-front"}),
        ("order", "middle-out", {"order": "middle-out"}),
        ("exponent", "1/3", {"fisher_exponent": 1 / 3}), ("exponent", "1/2", {"fisher_exponent": 0.5}),
        ("exponent", "2/3", {"fisher_exponent": 2 / 3}), ("exponent", "1", {"fisher_exponent": 1.0}),
        ("allocation", "depth", {"allocation": "depth"}), ("allocation", "uniform", {"allocation": "uniform"}),
        ("allocation", "global knapsack", {"allocation": "global"}),
        ("split", f"attention {attn_ratio_of(ratio, VAC_ATTN_SHARE):.2f}x", {"attn_ratio": attn_ratio_of(ratio, VAC_ATTN_SHARE)}),
        ("split", "none", {"attn_ratio": ratio}),
        ("split", f"attention lighter ({attn_ratio_of(ratio, 0.5):.2f}x)", {"attn_ratio": attn_ratio_of(ratio, 0.5)}),
    ]


def run_ablation(setup: SearchSetup, out: Path | str, progress: bool = True,
                 log: Callable[[str], None] = _stderr) -> dict:
    """Compress the default config with one setting changed at a time (full config, shared dense
    statistics), score each on the search and eval splits; ``out/ablation.json`` (resumable) and
    ``out/ablation.md``."""
    from .zoo import load_model

    check_sources(setup.calib, setup.search_data, setup.eval_data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ablation.json"
    doc = {"setup": setup.to_json(), "results": {}}
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("setup") == doc["setup"]:
            doc = previous
    model, tok = load_model(setup.model)
    if tok is None:
        raise VacError(f"{setup.model} has no tokenizer")
    data = setup.data()
    check_budget(model, VacConfig(ratio=setup.ratio, **data))
    calib = sample_windows(tok, setup.calib, setup.seq_len, setup.calib_windows, seed=0)
    search_w = eval_windows(tok, setup.search_data, setup.seq_len, setup.search_windows)
    eval_w = eval_windows(tok, setup.eval_data, setup.seq_len, setup.eval_windows) if setup.eval_data else None
    _, seq_stats = cached_statistics(model, calib, setup, out / "cache" / statistics_key(setup), progress)
    step_cost = max_step(matrices_of(model), setup.rank_step, setup.rank_floor)
    default_key = json.dumps(VacConfig(ratio=setup.ratio, **data).to_dict(), sort_keys=True)
    rows = []
    for study, setting, overrides in ablation_rows(setup.ratio):
        cfg = VacConfig(ratio=setup.ratio, **data, **overrides)
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key not in doc["results"]:
            t0 = time.perf_counter()
            net, result = full_compress(model, calib, seq_stats, cfg, step_cost)
            entry = {"config": cfg.to_dict(), "ratio_reached": result.ratio, "params_after": result.params_after,
                     "component_ratio": component_ratios(model, result.ranks),
                     "search_ppl": perplexity(net, search_w, progress=False)["ppl"],
                     "eval_ppl": perplexity(net, eval_w, progress=False)["ppl"] if eval_w is not None else None,
                     "seconds": time.perf_counter() - t0}
            doc["results"][key] = entry
            _write_json(path, doc)
            log(f"ablation {study} = {setting}: search PPL {entry['search_ppl']:.3f}"
                + (f", eval PPL {entry['eval_ppl']:.3f}" if entry["eval_ppl"] is not None else ""))
        rows.append({"study": study, "setting": setting, "default": key == default_key, **doc["results"][key]})
    doc["rows"] = rows
    doc["protocol"] = (f"{setup.model} at {setup.ratio:g}x, vac (the `vac compress` default) with one setting changed; "
                       f"PPL on the first {setup.search_windows} (search: {setup.search_data}) and "
                       f"{setup.eval_windows} (eval: {setup.eval_data}) non-overlapping windows of {setup.seq_len} "
                       f"tokens; calibration {setup.calib_windows} windows of {setup.calib}")
    _write_json(path, doc)
    _atomic_write(out / "ablation.md", ablation_markdown(doc))
    return doc


def ablation_markdown(doc: dict) -> str:
    fmt = lambda x: "-" if x is None else (f"{x:.2f}" if x < 1e4 else f"{x:.2e}")  # noqa: E731
    lines = [doc["protocol"] + ".", "", "| study | setting | search PPL | eval PPL | ratio reached | attn / mlp |",
             "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        c = r["component_ratio"]
        lines.append(f"| {r['study']} | {r['setting']}{' (default)' if r['default'] else ''} | "
                     f"{fmt(r['search_ppl'])} | {fmt(r['eval_ppl'])} | {r['ratio_reached']:.3f}x | "
                     f"{c['attn']:.2f}x / {c['mlp']:.2f}x |")
    return "\n".join(lines) + "\n"


def ablation_table(doc: dict):
    from rich.table import Table

    table = Table(title="ablation (one setting changed from the default)", show_edge=False)
    for col in ("study", "setting", "search PPL", "eval PPL", "ratio", "attn / mlp"):
        table.add_column(col, justify="left" if col in ("study", "setting") else "right")
    for r in doc["rows"]:
        c = r["component_ratio"]
        table.add_row(r["study"], r["setting"] + (" *" if r["default"] else ""), f"{r['search_ppl']:.3f}",
                      "-" if r["eval_ppl"] is None else f"{r['eval_ppl']:.3f}", f"{r['ratio_reached']:.3f}x",
                      f"{c['attn']:.2f}x / {c['mlp']:.2f}x")
    return table
