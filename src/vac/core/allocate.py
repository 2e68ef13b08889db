"""Rank allocation: per-matrix error curves → multiple-choice knapsack → a rank map.

Each matrix offers a menu of choices: rank r on a grid (``floor``, ``floor+step``, … up to the largest
rank that still saves parameters) at cost ``r·(m+n)`` parameters, or staying dense at cost ``m·n``
with zero error. The knapsack picks one choice per matrix so that the summed estimated loss is least
and the summed cost stays within the budget. It is solved exactly by dynamic programming over integer
costs in units of ``g`` = gcd of all choice costs (when that grid would exceed ``max_units`` cells,
costs are rounded up to a coarser unit, so the budget still holds and is met within one unit).

Allocations are registered by name (:func:`register_allocation`): ``fn(matrices, arch, strategy) ->
{path: rank}`` over :class:`Matrix` entries whose ``curve`` is set when the allocation uses curves.
The budget is first split between the attention and MLP components (:func:`component_ratios`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import VacError
from ..models.families import arch_for
from ..models.layers import low_rank_params, max_useful_rank

DENSE = 0  # a rank of 0 in an allocation means "keep this matrix dense"


@dataclass
class Matrix:
    path: str
    out_features: int
    in_features: int
    curve: torch.Tensor | None = None  # curve[r] = estimated loss increase at rank r, r = 0..min(m,n)

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    def params(self, rank: int) -> int:
        return self.dense_params if rank == DENSE else low_rank_params(self.out_features, self.in_features, rank)

    def choices(self, step: int, floor: int) -> list[int]:
        top = max_useful_rank(self.out_features, self.in_features)
        ranks = list(range(max(1, floor), top + 1, step))
        if ranks and ranks[-1] != top:
            ranks.append(top)
        return ranks + [DENSE]

    def loss(self, rank: int) -> float:
        return 0.0 if rank == DENSE else float(self.curve[rank])


def uniform_ranks(matrices: list[Matrix], ratio: float) -> dict[str, int]:
    """The rank giving each matrix ``ratio``-times fewer parameters: r = ⌊m·n / (ratio·(m+n))⌋."""
    ranks = {}
    for m in matrices:
        r = math.floor(m.dense_params / (ratio * (m.out_features + m.in_features)))
        if r < 1:
            raise VacError(
                f"ratio {ratio:g} is too large for {m.path} ({m.out_features}x{m.in_features}): rank < 1"
            )
        ranks[m.path] = r
    return ranks


def knapsack(
    matrices: list[Matrix], budget: int, step: int = 8, floor: int = 8, max_units: int = 200_000
) -> dict[str, int]:
    """Least total estimated loss with total parameters ≤ ``budget``: {path: rank or DENSE}."""
    menus = [m.choices(step, floor) for m in matrices]
    costs = [[m.params(r) for r in menu] for m, menu in zip(matrices, menus)]
    unit = math.gcd(*[c for row in costs for c in row])
    unit = max(unit, math.ceil(budget / max_units / unit) * unit)
    cells = budget // unit
    if sum(min(row) for row in costs) > budget:
        raise VacError(
            f"budget of {budget:,} parameters is below the smallest allocation "
            f"({sum(min(row) for row in costs):,}); lower the ratio or the rank floor"
        )
    best = np.zeros(cells + 1)  # best[b]: least loss of the items so far within b units
    picks = np.zeros((len(matrices), cells + 1), dtype=np.int16)
    for i, (m, menu, row) in enumerate(zip(matrices, menus, costs)):
        new = np.full(cells + 1, np.inf)
        for j, (rank, cost) in enumerate(zip(menu, row)):
            c = math.ceil(cost / unit)
            if c > cells:
                continue
            cand = np.full(cells + 1, np.inf)
            cand[c:] = best[: cells + 1 - c] + m.loss(rank)
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = j
        best = new
    if not np.isfinite(best[cells]):
        raise VacError(f"no allocation fits a budget of {budget:,} parameters")
    ranks, b = {}, cells
    for i in reversed(range(len(matrices))):
        j = picks[i, b]
        ranks[matrices[i].path] = menus[i][j]
        b -= math.ceil(costs[i][j] / unit)
    ranks = dict(reversed(list(ranks.items())))
    if unit > math.gcd(*[c for row in costs for c in row]):
        _top_up(matrices, menus, ranks, budget)
    return ranks


def _top_up(matrices, menus, ranks, budget) -> None:
    """Spend, greedily, the budget that rounding costs up to a coarse unit left unused (up to one
    unit per matrix): move a matrix to its next choice while one fits, best loss drop per parameter
    first, so the slack ends below the largest single step."""
    spent = sum(m.params(ranks[m.path]) for m in matrices)
    while True:
        best = None
        for m, menu in zip(matrices, menus):
            j = menu.index(ranks[m.path])
            if j + 1 == len(menu):
                continue
            extra = m.params(menu[j + 1]) - m.params(menu[j])
            if spent + extra > budget:
                continue
            gain = (m.loss(menu[j]) - m.loss(menu[j + 1])) / extra
            if best is None or gain > best[0]:
                best = (gain, m, menu[j + 1], extra)
        if best is None:
            return
        _, m, rank, extra = best
        ranks[m.path] = rank
        spent += extra


def total_params(matrices: list[Matrix], ranks: dict[str, int]) -> int:
    return sum(m.params(ranks[m.path]) for m in matrices)


def matrices_of(model) -> list[Matrix]:
    """Every decoder linear of ``model`` as a :class:`Matrix` (no curve yet), layer by layer."""
    arch = arch_for(model)
    n_layers = len(model.get_submodule(arch.layers))
    result = []
    for path in arch.decoder_linears(n_layers):
        linear = model.get_submodule(path)
        result.append(Matrix(path, linear.out_features, linear.in_features))
    return result


def component_ratios(matrices: list[Matrix], arch, strategy) -> dict[str, float]:
    """Ratio per component: the fixed ones as given; a free one gets what the global budget leaves
    (both free: the global ratio)."""
    dense = {c: sum(m.dense_params for m in matrices if arch.component(m.path) == c) for c in ("attn", "mlp")}
    fixed = {c: r for c, r in (("attn", strategy.attn_ratio), ("mlp", strategy.mlp_ratio)) if r}
    if len(fixed) != 1:
        return {c: fixed.get(c, strategy.ratio) for c in dense}
    (c, r), = fixed.items()
    other = "mlp" if c == "attn" else "attn"
    left = sum(dense.values()) / strategy.ratio - dense[c] / r
    if left <= 0:
        raise VacError(f"--{c}-ratio {r:g} leaves no budget for the {other} linears at --ratio {strategy.ratio:g}")
    return {c: r, other: dense[other] / left}


def reached_ratios(matrices: list[Matrix], arch, ranks: dict[str, int]) -> dict[str, float]:
    """Reached ratio of the attention and MLP linears for a rank map (missing/0 = dense)."""
    result = {}
    for comp in ("attn", "mlp"):
        part = [m for m in matrices if arch.component(m.path) == comp]
        result[comp] = sum(m.dense_params for m in part) / sum(m.params(ranks.get(m.path, DENSE)) for m in part)
    return result


@dataclass(frozen=True)
class AllocationSpec:
    name: str
    assign: Callable  # (matrices, arch, strategy) -> {path: rank}
    needs_curves: bool = True


ALLOCATIONS: dict[str, AllocationSpec] = {}


def register_allocation(name: str, *, needs_curves: bool = True):
    """Decorator: register ``fn(matrices, arch, strategy) -> {path: rank}`` as allocation ``name``."""

    def deco(fn):
        ALLOCATIONS[name] = AllocationSpec(name, fn, needs_curves)
        return fn

    return deco


def assign_ranks(matrices: list[Matrix], arch, strategy) -> dict[str, int]:
    """The rank map of ``strategy.allocation`` (``strategy`` resolved; curves set if it needs them)."""
    return ALLOCATIONS[strategy.allocation].assign(matrices, arch, strategy)


@register_allocation("uniform", needs_curves=False)
def _uniform(matrices, arch, strategy) -> dict[str, int]:
    """One rank per matrix type: each component's ratio."""
    ranks = {}
    for comp, ratio in component_ratios(matrices, arch, strategy).items():
        ranks.update(uniform_ranks([m for m in matrices if arch.component(m.path) == comp], ratio))
    return ranks


@register_allocation("depth")
def _depth(matrices, arch, strategy) -> dict[str, int]:
    """Per matrix type, the parameters of its uniform ranks, spread over the layers by a knapsack."""
    ranks = {}
    ratios = component_ratios(matrices, arch, strategy)
    for kind in dict.fromkeys(arch.kind(m.path) for m in matrices):
        part = [m for m in matrices if arch.kind(m.path) == kind]
        uniform = uniform_ranks(part, ratios[arch.component(part[0].path)])
        ranks.update(knapsack(part, total_params(part, uniform), strategy.rank_step, strategy.rank_floor))
    return ranks


@register_allocation("global")
def _global(matrices, arch, strategy) -> dict[str, int]:
    """One knapsack per component over all its matrices (one over all, without a split)."""
    if not (strategy.attn_ratio or strategy.mlp_ratio):
        budget = int(sum(m.dense_params for m in matrices) / strategy.ratio)
        return knapsack(matrices, budget, strategy.rank_step, strategy.rank_floor)
    ranks = {}
    for c, ratio in component_ratios(matrices, arch, strategy).items():
        part = [m for m in matrices if arch.component(m.path) == c]
        budget = int(sum(m.dense_params for m in part) / ratio)
        ranks.update(knapsack(part, budget, strategy.rank_step, strategy.rank_floor))
    return ranks
