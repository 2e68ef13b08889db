"""The search space of ``vac search``: genomes, their mutation and crossover, the setup, the budget.

A :class:`Genome` is one compression strategy (layer order, method, Fisher exponent, attention/MLP
split share, allocation, per-type curve weights) and decodes to a :class:`~vac.pipeline.VacConfig` at
the requested ratio; :func:`assert_budget` checks that no decoded rank map holds more parameters than
the budget. :func:`check_sources` keeps the calibration, search and evaluation texts disjoint.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from .allocate import DENSE, Matrix
from .arch import arch_for
from .corpora import CORPORA, split_docs
from .data import DEFAULT_EVAL, DEFAULT_SEARCH
from .errors import VacError
from .pipeline import (
    ORDERS,
    VAC_ATTN_SHARE,
    VacConfig,
    _component_ratios,
    attn_ratio_of,
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
            "split": f"attn share {self.attn:g}",  # attn_ratio = 1 + (ratio − 1) · share
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


SHARED_FIELDS = ("calib", "calib_windows", "fisher_windows", "seq_len", "rank_step", "rank_floor")


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
    # SHARED_FIELDS: passed unchanged to every genome's VacConfig, with its defaults
    calib: str = VacConfig.calib
    calib_windows: int = VacConfig.calib_windows
    fisher_windows: int = VacConfig.fisher_windows
    seq_len: int = VacConfig.seq_len
    rank_step: int = VacConfig.rank_step
    rank_floor: int = VacConfig.rank_floor
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
        return {name: getattr(self, name) for name in SHARED_FIELDS}

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
