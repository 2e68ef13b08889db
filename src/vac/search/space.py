"""The search space of ``vac search``: genomes, their mutation and crossover, the setup, the budget.

A :class:`Genome` is one compression strategy (layer order, method, Fisher exponent, attention/MLP
split share, allocation, per-type curve weights) and decodes to a :class:`~vac.config.CompressConfig` at
the requested ratio; :func:`assert_budget` checks that no decoded rank map holds more parameters than
the budget. :func:`check_sources` keeps the calibration, search and evaluation texts disjoint.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
from typing import Callable

from ..config import (
    DEFAULT_MODEL,
    DEFAULT_SEARCH,
    CompressConfig,
    DataConfig,
    EvalConfig,
    StrategyConfig,
    attn_ratio_of,
)
from ..core.allocate import ALLOCATIONS as ALLOCATION_REGISTRY
from ..core.allocate import Matrix, component_ratios, matrices_of
from ..core.methods import METHODS
from ..core.orders import ORDERS, describe_order, layer_order, order_name, outward, outward_gene
from ..data.specs import check_disjoint
from ..errors import VacError
from ..models.families import arch_for

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
EXPONENTS = (0.25, 1 / 3, 0.5, 2 / 3, 1.0)
ATTN_SHARES = (0.5, 1.0, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)  # attn_ratio = 1 + (ratio − 1) · share
ALLOCATIONS = tuple(ALLOCATION_REGISTRY)  # type weights matter to "global" only
LOG_WEIGHT_MAX = 2.0  # type weights are 2^w, w on a grid of 0.5 within ±LOG_WEIGHT_MAX
SEARCH_METHODS = ("vac", "whiten")
PROXY_SCORES = ("truncation", "short")  # SearchSetup.proxy_score
_DEFAULT = StrategyConfig().resolved()
DEFAULT_EXPONENT = _DEFAULT.fisher_exponent
DEFAULT_ORDER = _DEFAULT.order
DEFAULT_ALLOCATION = _DEFAULT.allocation
VAC_ATTN_SHARE = METHODS[_DEFAULT.method].attn_share


# ----------------------------------------------------------------------------- genome


@dataclass(frozen=True)
class Genome:
    order: tuple[int, ...]
    method: str = "vac"
    exponent: float = DEFAULT_EXPONENT
    attn: float = VAC_ATTN_SHARE  # attention split share (see config.attn_ratio_of; 1: no split)
    allocation: str = DEFAULT_ALLOCATION  # see core.allocate.ALLOCATIONS
    log_weights: tuple[float, ...] = (0.0,) * len(KINDS)  # log2 of the curve weight of q, k, …, down

    @classmethod
    def default(cls, n_layers: int) -> "Genome":
        """The default strategy: vac, its default order, exponent, split and allocation."""
        return cls(tuple(layer_order(DEFAULT_ORDER, n_layers)))

    def proxy_key(self) -> str:
        """Identity under the truncation proxy (which is blind to the layer order; whiten ignores the
        exponent, only the global knapsack uses the curve weights)."""
        weights = list(self.log_weights) if self.allocation == "global" else None
        return json.dumps([self.method, self.exponent if self.method == "vac" else None, self.attn,
                           self.allocation, weights])

    def full_key(self) -> str:
        return json.dumps([json.loads(self.proxy_key()), list(self.order)])

    def order_name(self) -> str | None:
        return order_name(self.order)

    def type_weights(self) -> dict[str, float] | None:
        weights = {k: 2.0 ** w for k, w in zip(KINDS, self.log_weights) if w != 0}
        return weights or None

    def strategy(self, ratio: float, *, full: bool, rank_step: int, rank_floor: int) -> StrategyConfig:
        """The strategy of this genome; ``full``: sequential, as `vac compress` (else the non-sequential proxy)."""
        return StrategyConfig(
            ratio=ratio, method=self.method, allocation=self.allocation, sequential=full,
            order=self.order_name() or tuple(self.order),
            fisher_exponent=self.exponent if self.method == "vac" else DEFAULT_EXPONENT,
            type_weights=self.type_weights() if self.allocation == "global" else None,
            attn_ratio=attn_ratio_of(ratio, self.attn), rank_step=rank_step, rank_floor=rank_floor,
        ).resolved()

    def config(self, setup: "SearchSetup", *, full: bool) -> CompressConfig:
        """This genome's compression under ``setup`` (its ratio, rank grid and calibration data)."""
        return CompressConfig(self.strategy(setup.ratio, full=full, **setup.grid()), setup.data_config())

    def describe(self) -> dict[str, str]:
        order = describe_order(self.order)
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

    def __init__(self, n_layers: int, methods=SEARCH_METHODS, shares=ATTN_SHARES, orders: tuple[str, ...] | None = None):
        """``orders``: the named orders a random genome starts from (None: every order of
        ``core.orders.ORDERS``, mutated within the outward family, ``core.orders.outward``; a tuple: only
        those, unmutated, as the streamed search)."""
        self.n_layers, self.methods, self.shares = n_layers, tuple(methods), tuple(shares)
        self.orders = tuple(orders or ORDERS)
        self.mutable_order = orders is None

    def random(self, rng: random.Random) -> Genome:
        """A random genome; half keep the default method and exponent (each new (method, exponent)
        costs one SVD of every matrix, minutes on a CPU), the other genes vary freely."""
        method = rng.choice(self.methods) if len(self.methods) > 1 and rng.random() < 0.5 else self.methods[0]
        exponent = DEFAULT_EXPONENT if rng.random() < 0.5 else rng.choice(EXPONENTS)
        attn = rng.choice(self.shares)
        allocation = rng.choice(ALLOCATIONS)
        weights = tuple(rng.choice((-1.0, -0.5, 0.0, 0.0, 0.0, 0.5, 1.0)) for _ in KINDS)
        order = tuple(layer_order(rng.choice(self.orders), self.n_layers))
        return Genome(order, method, exponent, attn, allocation, weights)

    def mutate(self, g: Genome, rng: random.Random) -> Genome:
        ops = ["exponent", "attn", "allocation", "weight", "weight"] + (["order"] if self.mutable_order else [])
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
        """A step within the outward family (its start moved by 1 to 3 layers, or its side flipped), or
        one of its orders at random (also the way back for a permutation outside the family)."""
        n, r, gene = self.n_layers, rng.random(), outward_gene(order)
        if gene is None or r >= 0.85:
            return tuple(outward(n, rng.randrange(n), rng.random() < 0.5))
        start, up_first = gene
        if r < 0.65:
            start = min(max(start + rng.choice((-3, -2, -1, 1, 2, 3)), 0), n - 1)
        else:
            up_first = not up_first
        return tuple(outward(n, start, up_first))

    def crossover(self, a: Genome, b: Genome, rng: random.Random) -> Genome:
        pick = lambda x, y: x if rng.random() < 0.5 else y  # noqa: E731
        donor = pick(a, b)
        return Genome(
            order=pick(a, b).order, method=donor.method, exponent=donor.exponent, attn=pick(a, b).attn,
            allocation=pick(a, b).allocation,
            log_weights=tuple(pick(x, y) for x, y in zip(a.log_weights, b.log_weights)),
        )

    def initial(self, rng: random.Random, size: int, key: Callable[[Genome], str], near: bool = False) -> list[Genome]:
        """The default genome and ``size − 1`` random ones (distinct keys where possible); ``near``:
        mutants of the default instead (where each score costs minutes, start beside the default)."""
        pop = [Genome.default(self.n_layers)]
        seen = {key(pop[0])}
        while len(pop) < size:
            for _ in range(50):
                g = self.mutate(pop[0], rng) if near else self.random(rng)
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


def check_sources(calib: str, search: str, evaluation: str | None) -> None:
    """Raise a one-line VacError if the search documents overlap the evaluation or calibration
    documents, or calibration overlaps evaluation."""
    hint = f" (the default search split is {DEFAULT_SEARCH})"
    check_disjoint([("search", search, "evaluation", evaluation, "--search-data", hint),
                    ("search", search, "calibration", calib, "--search-data", hint),
                    ("calibration", calib, "evaluation", evaluation, "--calib", hint)])


# ----------------------------------------------------------------------------- setup, budget


# the DataConfig fields a search takes (its calibration sampling seed is DataConfig's default)
DATA_FIELDS = ("calib", "calib_windows", "fisher_windows", "seq_len")


@dataclass
class SearchSetup:
    """Everything that decides a search's result (the run length, clock and workers do not)."""

    model: str = DEFAULT_MODEL
    ratio: float = StrategyConfig.ratio
    population: int = 8
    seed: int = 0
    search_data: str = DEFAULT_SEARCH
    search_windows: int = 8
    eval_data: str = EvalConfig.data
    eval_windows: int = EvalConfig.windows
    # DATA_FIELDS and the rank grid: shared by every genome, with the configs' defaults
    calib: str = DataConfig.calib
    calib_windows: int = DataConfig.calib_windows
    fisher_windows: int = DataConfig.fisher_windows
    seq_len: int = DataConfig.seq_len
    rank_step: int = StrategyConfig.rank_step
    rank_floor: int = StrategyConfig.rank_floor
    top_k: int = 3
    proxy: bool = True
    methods: tuple[str, ...] = SEARCH_METHODS
    # memory bounded by one decoder layer (vac.search.streamed)
    streamed: bool = False
    # the order gene's score under the proxy: the default genes compressed sequentially in that order on
    # this many calibration windows of order_seq_len tokens (the engines' short_score); None: 8 under the
    # proxy, 0 without it (0: the proxy stays blind to the order)
    order_windows: int | None = None
    order_seq_len: int = 256
    # refinement steps per layer of that short compression (None: the strategy's own, 24; 8 ranks five
    # genomes as the full compression does, benchmarks/short_proxy.py, at about half the cost)
    order_refine_steps: int | None = 8
    # what a genome's proxy fitness is: "short", its own short sequential compression (every gene, the
    # refinement included) from the order windows; "truncation" (cached factors, no sequential pass, no
    # refinement, seconds a genome) times its order's short score relative to the default order's, which
    # misranks genomes under the refinement (benchmarks/results/search.json, short_proxy.json)
    proxy_score: str = "short"

    def __post_init__(self):
        if self.order_windows is None:
            self.order_windows = 8 if self.proxy else 0
        if self.order_windows < 0:
            raise VacError(f"--order-windows must be at least 0, got {self.order_windows}")
        if self.order_windows and not self.proxy:
            raise VacError("--order-windows needs the proxy search (--no-proxy scores every order fully)")
        if self.proxy_score not in PROXY_SCORES:
            raise VacError(f"--proxy-score must be one of {', '.join(PROXY_SCORES)}, got '{self.proxy_score}'")
        if self.proxy and self.proxy_score == "short" and not self.order_windows:
            raise VacError("--proxy-score short needs --order-windows above 0 (its calibration windows)")
        if self.order_refine_steps is not None and self.order_refine_steps < 1:
            raise VacError(f"--order-refine-steps must be at least 1, got {self.order_refine_steps}")
        if self.order_seq_len < 2:
            raise VacError(f"--order-seq-len must be at least 2, got {self.order_seq_len}")
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

    def data_config(self) -> DataConfig:
        """The calibration data every genome shares."""
        return DataConfig(**{name: getattr(self, name) for name in DATA_FIELDS})

    def inputs(self) -> dict:
        """What a search reads, by role (its output folder must overlap none of them)."""
        return {"model": self.model, "calibration data": self.calib, "search data": self.search_data,
                "evaluation data": self.eval_data}

    def grid(self) -> dict:
        return {"rank_step": self.rank_step, "rank_floor": self.rank_floor}

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def memo_key(self, g: Genome) -> str:
        return g.proxy_key() if self.proxy and not self.order_windows else g.full_key()

    def order_data(self) -> DataConfig:
        """The calibration data of the short compressions (the search's, fewer and shorter windows). Their
        dense statistics (Fisher, allocation curves) are the full run's, from its first ``fisher_windows``
        calibration windows: the engines pass them in (from the short windows, the exponent was misranked,
        ``benchmarks/short_proxy.py``)."""
        return DataConfig(calib=self.calib, calib_windows=self.order_windows, fisher_windows=self.fisher_windows,
                          seq_len=self.order_seq_len)

    def short_config(self, g: Genome) -> CompressConfig:
        """``g``'s short sequential compression (the engines' ``short_score``): its full strategy, the
        refinement at ``order_refine_steps``, from the order windows (:meth:`order_data`)."""
        strategy = g.strategy(self.ratio, full=True, **self.grid())
        if self.order_refine_steps is not None:
            strategy = replace(strategy, refine_steps=self.order_refine_steps)
        return CompressConfig(strategy, self.order_data())

    def order_calibration(self, tokenizer):
        """The calibration windows of the order score (:meth:`order_data`, sampled as ``vac compress`` samples)."""
        from ..data.windows import sample_windows

        d = self.order_data()
        return sample_windows(tokenizer, d.calib, d.seq_len, d.calib_windows, seed=d.seed)


def max_step(matrices: list[Matrix], step: int, floor: int) -> int:
    """The largest parameter cost of moving one matrix to its next choice (a rank step or dense)."""
    worst = 0
    for m in matrices:
        costs = [m.params(r) for r in m.choices(step, floor)]
        worst = max(worst, max((b - a for a, b in zip(costs, costs[1:])), default=0))
    return worst


def assert_budget(params_before: int, params_after: int, cfg: StrategyConfig, step_cost: int) -> None:
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
    matrices = matrices_of(model)
    for share in ATTN_SHARES:
        cfg = StrategyConfig(ratio=setup.ratio, attn_ratio=attn_ratio_of(setup.ratio, share), **setup.grid())
        try:
            ratios = component_ratios(matrices, arch, cfg)
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
