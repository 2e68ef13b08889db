"""Tests for vac.core.allocate: the multiple-choice knapsack against brute force, budget use, uniform ranks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vac.core.allocate import DENSE, Matrix, knapsack, total_params, uniform_ranks
from vac.errors import VacError
from vac.models.layers import max_useful_rank

SMOL_SHAPES = [  # SmolLM-135M decoder linears: (name, out, in)
    ("q", 576, 576), ("k", 192, 576), ("v", 192, 576), ("o", 576, 576),
    ("gate", 1536, 576), ("up", 1536, 576), ("down", 576, 1536),
]


def decreasing_curve(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """A random, strictly decreasing loss curve of length min(m, n) + 1 ending at 0."""
    k = min(m, n)
    steps = torch.rand(k, generator=g, dtype=torch.float64) + 0.01
    return torch.cat([steps.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])


def convex_curve(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Tail energy of random sorted singular values: decreasing and convex, like a real curve."""
    s = torch.rand(min(m, n), generator=g, dtype=torch.float64).sort(descending=True).values
    sq = s.square() * (0.1 + torch.rand(1, generator=g, dtype=torch.float64))
    return torch.cat([sq.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])


def smol_instance(layers: int, seed: int = 0) -> list[Matrix]:
    g = torch.Generator().manual_seed(seed)
    return [
        Matrix(f"model.layers.{i}.{name}", m, n, convex_curve(m, n, g))
        for i in range(layers) for name, m, n in SMOL_SHAPES
    ]


def brute_force(matrices, budget, step, floor):
    menus = [m.choices(step, floor) for m in matrices]
    best = math.inf
    for combo in itertools.product(*menus):
        cost = sum(m.params(r) for m, r in zip(matrices, combo))
        if cost <= budget:
            best = min(best, sum(m.loss(r) for m, r in zip(matrices, combo)))
    return best


def allocation_loss(matrices, ranks):
    return sum(m.loss(ranks[m.path]) for m in matrices)


# --- Matrix basics --------------------------------------------------------------------------------

def test_choices_grid_top_and_dense():
    m = Matrix("a", 12, 8)  # top = (96 - 1) // 20 = 4
    assert max_useful_rank(12, 8) == 4
    assert m.choices(1, 1) == [1, 2, 3, 4, DENSE]
    assert m.choices(3, 1) == [1, 4, DENSE]  # the top rank is always offered
    assert m.choices(2, 2) == [2, 4, DENSE]
    assert m.choices(1, 9) == [DENSE]  # floor above the useful ranks: dense only
    assert m.params(DENSE) == 96 and m.params(3) == 60
    assert m.params(4) < m.params(DENSE) <= m.params(5)


# --- optimality ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_knapsack_matches_brute_force(seed):
    g = torch.Generator().manual_seed(100 + seed)
    shapes = [(12, 8), (10, 10), (6, 16), (9, 14), (16, 5)]
    count = 3 + seed % 3
    pick = torch.randperm(len(shapes), generator=g)[:count].tolist()
    matrices = [
        Matrix(f"m{i}", *shapes[j], decreasing_curve(*shapes[j], g)) for i, j in enumerate(pick)
    ]
    step = 1 + seed % 2
    floor = 1
    smallest = sum(min(m.params(r) for r in m.choices(step, floor)) for m in matrices)
    dense = sum(m.dense_params for m in matrices)
    checked = 0
    for frac in (0.0, 0.15, 0.4, 0.7, 0.95):
        budget = int(smallest + frac * (dense - smallest))
        ranks = knapsack(matrices, budget, step=step, floor=floor)
        assert set(ranks) == {m.path for m in matrices}
        for m in matrices:
            assert ranks[m.path] in m.choices(step, floor)
        assert total_params(matrices, ranks) <= budget
        expected = brute_force(matrices, budget, step, floor)
        assert allocation_loss(matrices, ranks) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        checked += 1
    assert checked == 5


def test_knapsack_below_smallest_allocation_raises():
    g = torch.Generator().manual_seed(0)
    matrices = [Matrix("a", 12, 8, decreasing_curve(12, 8, g)), Matrix("b", 10, 10, decreasing_curve(10, 10, g))]
    smallest = 20 + 20  # rank 1 of each
    assert knapsack(matrices, smallest, step=1, floor=1) == {"a": 1, "b": 1}
    with pytest.raises(VacError, match="below the smallest allocation"):
        knapsack(matrices, smallest - 1, step=1, floor=1)


# --- budget use ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [1.25, 1.5, 1.8, 2.0])
def test_knapsack_budget_exact_smollm_shapes(ratio):
    matrices = smol_instance(layers=4)
    dense = sum(m.dense_params for m in matrices)
    budget = int(dense / ratio)
    step = 8
    ranks = knapsack(matrices, budget, step=step, floor=8)
    spent = total_params(matrices, ranks)
    largest_step = max(step * (m.out_features + m.in_features) for m in matrices)
    assert spent <= budget
    assert budget - spent < largest_step
    assert dense / spent == pytest.approx(ratio, rel=largest_step / budget)
    # not a degenerate answer: ranks differ across matrices of one shape (curves differ)
    assert len({ranks[m.path] for m in matrices if m.path.endswith(".gate")}) > 1


def test_knapsack_coarse_units_stay_within_budget():
    """With more cost cells than ``max_units`` the costs are rounded up: the budget must still hold."""
    matrices = smol_instance(layers=30)
    dense = sum(m.dense_params for m in matrices)
    for ratio in (1.25, 2.0):
        budget = int(dense / ratio)
        ranks = knapsack(matrices, budget, step=8, floor=8, max_units=2_000)
        assert total_params(matrices, ranks) <= budget


def test_knapsack_coarse_units_meet_budget_within_one_step():
    matrices = smol_instance(layers=30)
    dense = sum(m.dense_params for m in matrices)
    step = 8
    largest_step = max(step * (m.out_features + m.in_features) for m in matrices)
    budget = int(dense / 1.5)
    ranks = knapsack(matrices, budget, step=step, floor=8, max_units=2_000)
    assert budget - total_params(matrices, ranks) < largest_step


# --- dense choice ----------------------------------------------------------------------------------

def test_everything_dense_when_budget_allows():
    matrices = smol_instance(layers=1)
    dense = sum(m.dense_params for m in matrices)
    ranks = knapsack(matrices, dense, step=8, floor=8)
    assert ranks == {m.path: DENSE for m in matrices}
    assert total_params(matrices, ranks) == dense


def test_barely_compressed_keeps_all_but_the_cheapest_matrix_dense():
    """Ratio barely above 1: one matrix at its top rank (least loss there), all others dense."""
    matrices = smol_instance(layers=2)
    dense = sum(m.dense_params for m in matrices)
    budget = int(dense / 1.000001)
    assert budget < dense
    ranks = knapsack(matrices, budget, step=8, floor=8)
    low = {p: r for p, r in ranks.items() if r != DENSE}
    assert len(low) == 1
    cheapest = min(matrices, key=lambda m: m.loss(max_useful_rank(m.out_features, m.in_features)))
    assert low == {cheapest.path: max_useful_rank(cheapest.out_features, cheapest.in_features)}
    assert total_params(matrices, ranks) <= budget


# --- uniform ---------------------------------------------------------------------------------------

def test_uniform_ranks_formula():
    matrices = [Matrix(f"model.layers.0.{n}", m, k) for n, m, k in SMOL_SHAPES] + [Matrix("x", 12, 8)]
    for ratio in (1.25, 1.5, 1.8, 2.0, 3.0):
        ranks = uniform_ranks(matrices, ratio)
        for m in matrices:
            r = ranks[m.path]
            assert r == math.floor(m.out_features * m.in_features / (ratio * (m.out_features + m.in_features)))
            assert m.params(r) <= m.dense_params / ratio < m.params(r + 1)
    assert uniform_ranks([Matrix("q", 576, 576)], 2.0) == {"q": 144}
    assert uniform_ranks([Matrix("k", 192, 576)], 1.5) == {"k": 96}
    assert uniform_ranks([Matrix("x", 12, 8)], 2.0) == {"x": 2}  # 96 / 40 = 2.4


def test_uniform_ranks_ratio_too_large():
    assert uniform_ranks([Matrix("x", 6, 16)], 4.36) == {"x": 1}  # 96 / (4.36 * 22) = 1.0008
    with pytest.raises(VacError, match="too large for x"):
        uniform_ranks([Matrix("ok", 576, 576), Matrix("x", 6, 16)], 4.37)
