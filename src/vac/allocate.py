"""Rank allocation: per-matrix error curves → multiple-choice knapsack → a rank map.

Each matrix offers a menu of choices: rank r on a grid (``floor``, ``floor+step``, … up to the largest
rank that still saves parameters) at cost ``r·(m+n)`` parameters, or staying dense at cost ``m·n``
with zero error. The knapsack picks one choice per matrix so that the summed estimated loss is least
and the summed cost stays within the budget. It is solved exactly by dynamic programming over integer
costs in units of ``g`` = gcd of all choice costs (when that grid would exceed ``max_units`` cells,
costs are rounded up to a coarser unit, so the budget still holds and is met within one unit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import VacError
from .layers import low_rank_params, max_useful_rank

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
