"""Tests for vac.core.driver: layer orders, config checks and end-to-end compression of a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tokens

from vac import checkpoint
from vac.checkpoint.hf.modeling_vac import LowRankLinear
from vac.config import CompressConfig, StrategyConfig
from vac.core.allocate import DENSE, matrices_of, uniform_ranks
from vac.core.driver import compress, sequential_passes
from vac.core.methods import METHODS
from vac.core.orders import layer_order
from vac.errors import VacError
from vac.models.families import arch_for

WINDOWS = tokens(8, 32)
STEP = 2  # fine rank grid: a tiny model's budget can be met closely


def config(**kw):
    base = dict(fisher_windows=4, batch_size=4, seq_len=32, calib_windows=8, rank_step=STEP, rank_floor=2)
    base.update(kw)
    return CompressConfig.of(**base)


def run(cfg, **model_kw):
    model = tiny_llama(**model_kw)
    result = compress(model, WINDOWS, cfg, progress=False)
    return model, result


def decoder_weights(model) -> dict[str, torch.Tensor]:
    """Effective weight of every decoder linear (up @ down for a low-rank one)."""
    out = {}
    for m in matrices_of(model):
        mod = model.get_submodule(m.path)
        if isinstance(mod, LowRankLinear):
            out[m.path] = (mod.up.weight @ mod.down.weight).detach()
        else:
            out[m.path] = mod.weight.detach()
    return out


def counted_params(model) -> int:
    total = 0
    for m in matrices_of(tiny_llama()):
        mod = model.get_submodule(m.path)
        total += sum(p.numel() for p in mod.parameters())
    return total


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# --- layer order -----------------------------------------------------------------------------------

def test_layer_order_named():
    assert layer_order("middle-out", 6) == [3, 4, 2, 5, 1, 0]
    assert layer_order("middle-out", 5) == [2, 3, 1, 4, 0]
    assert layer_order("middle-out", 1) == [0]
    assert layer_order("front-to-back", 4) == [0, 1, 2, 3]
    assert layer_order("back-to-front", 4) == [3, 2, 1, 0]


def test_layer_order_explicit():
    assert layer_order([2, 0, 3, 1], 4) == [2, 0, 3, 1]
    assert layer_order("2,0,3,1", 4) == [2, 0, 3, 1]
    assert layer_order(" 1, 0", 2) == [1, 0]
    assert layer_order(("1", "0"), 2) == [1, 0]


@pytest.mark.parametrize("bad", [[0, 0, 1], [0, 1], [0, 1, 2, 3], [1, 2, 3], "0,0,1", "2,1", "sideways"])
def test_layer_order_rejects(bad):
    with pytest.raises(VacError):
        layer_order(bad, 3)


# --- StrategyConfig -------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.0, -2.0, float("nan")])
def test_config_rejects_ratio_at_most_one(ratio):
    with pytest.raises(VacError, match="ratio must be greater than 1"):
        StrategyConfig(ratio=ratio)


def test_config_rejects_unknown_method_and_allocation():
    with pytest.raises(VacError, match="unknown method 'lora'"):
        StrategyConfig(method="lora")
    with pytest.raises(VacError, match="unknown allocation"):
        StrategyConfig(allocation="greedy")
    with pytest.raises(VacError, match="attn-ratio must be greater than 1"):
        StrategyConfig(attn_ratio=1.0)
    with pytest.raises(VacError, match="mlp-ratio must be greater than 1"):
        StrategyConfig(mlp_ratio=0.9)


def test_config_method_defaults():
    def resolved(**kw):  # the resolved strategy: every method default filled in
        return StrategyConfig(**kw).resolved()

    vac = resolved(method="vac")
    assert (vac.allocation, vac.sequential, vac.needs_fisher, vac.needs_inputs) == ("global", True, True, True)
    assert vac.refine == "dense" and StrategyConfig(method="vac", sequential=False).resolved().refine == "none"
    assert (vac.fisher_exponent, vac.attn_ratio) == (2 / 3, 2.4)  # attention 2.4x at --ratio 1.8
    assert resolved(method="fwsvd").fisher_exponent == 0.5 and resolved(method="whiten").attn_ratio is None
    assert resolved(method="vac", mlp_ratio=1.5).attn_ratio is None  # the free component gets the rest
    svd = resolved(method="svd")
    assert (svd.allocation, svd.sequential, svd.needs_fisher, svd.needs_inputs) == ("uniform", False, False, False)
    assert resolved(method="fwsvd").needs_fisher and not resolved(method="fwsvd").needs_inputs
    assert resolved(method="asvd").needs_inputs and not resolved(method="asvd").needs_fisher
    explicit = resolved(method="vac", allocation="uniform", sequential=False)
    assert (explicit.allocation, explicit.sequential) == ("uniform", False)


# --- compress --------------------------------------------------------------------------------------

@pytest.mark.parametrize("allocation", ["uniform", "depth", "global"])
@pytest.mark.parametrize("method", METHODS)
def test_compress_meets_the_ratio(method, allocation):
    ratio = 1.5
    cfg = config(method=method, ratio=ratio, allocation=allocation)
    dense_model = tiny_llama()
    model, result = run(cfg)
    matrices = matrices_of(dense_model)
    before = sum(m.dense_params for m in matrices)
    budget = int(before / ratio)
    assert result.params_before == before == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 160 * 64)
    assert result.params_after <= budget
    assert result.ratio >= ratio
    largest_step = STEP * (160 + 64)
    if allocation == "global":
        assert budget - result.params_after < largest_step
    assert result.ratio <= ratio * (1 + 0.05)
    # the rank map matches the model, and the counted parameters match the reported ones
    lowrank = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert lowrank == result.ranks
    assert DENSE not in result.ranks.values()
    assert counted_params(model) == result.params_after
    assert set(result.seconds) == {"statistics", "allocation", "factorization"}
    out = logits(model, WINDOWS[:2])
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, logits(dense_model, WINDOWS[:2]), atol=1e-4)


def test_depth_allocation_spreads_each_type_budget_over_the_layers():
    ratio = 1.5
    model, result = run(config(method="vac", ratio=ratio, attn_ratio=ratio, allocation="depth"), layers=4)
    arch, matrices = arch_for(model), matrices_of(tiny_llama(layers=4))
    uniform = uniform_ranks(matrices, ratio)
    varied = set()
    for kind in ("q", "k", "v", "o", "gate", "up", "down"):
        part = [m for m in matrices if arch.kind(m.path) == kind]
        budget = sum(m.params(uniform[m.path]) for m in part)
        spent = sum(m.params(result.ranks.get(m.path, DENSE)) for m in part)
        step = STEP * (part[0].out_features + part[0].in_features)
        assert budget - step < spent <= budget  # the type's uniform budget, met within one rank step
        if len({result.ranks.get(m.path, DENSE) for m in part}) > 1:
            varied.add(kind)
    assert varied  # the knapsack moves rank between layers


def test_compress_uniform_ranks_are_uniform():
    _, result = run(config(method="svd", ratio=2.0))
    # r = floor(m n / (2 (m + n))): q/o 64x64 -> 16, k/v 32x64 -> 10, gate/up/down 160x64 -> 22
    expected = {"q_proj": 16, "k_proj": 10, "v_proj": 10, "o_proj": 16,
                "gate_proj": 22, "up_proj": 22, "down_proj": 22}
    assert len(result.ranks) == 14
    for path, r in result.ranks.items():
        assert r == expected[path.rsplit(".", 1)[-1]]


def test_compress_svd_factors_are_truncated_svd():
    dense = decoder_weights(tiny_llama())
    model, result = run(config(method="svd", ratio=2.0))
    got = decoder_weights(model)
    for path, r in result.ranks.items():
        u, s, vh = torch.linalg.svd(dense[path].double(), full_matrices=False)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        torch.testing.assert_close(got[path].double(), best, rtol=0, atol=1e-5)


def test_vac_sequential_differs_and_both_round_trip(tmp_path):
    seq_model, seq_result = run(config(method="vac", ratio=1.5, sequential=True))
    par_model, par_result = run(config(method="vac", ratio=1.5, sequential=False))
    seq_w, par_w = decoder_weights(seq_model), decoder_weights(par_model)
    differing = [p for p in seq_w if not torch.allclose(seq_w[p], par_w[p], atol=1e-6)]
    assert differing
    ids = tokens(2, 20, seed=7)
    assert not torch.allclose(logits(seq_model, ids), logits(par_model, ids), atol=1e-5)
    for name, model, result in (("seq", seq_model, seq_result), ("par", par_model, par_result)):
        assert result.params_after <= int(result.params_before / 1.5)
        before = logits(model, ids)
        folder = checkpoint.save(model, None, tmp_path / name)
        loaded, tokenizer = checkpoint.load(folder)
        assert tokenizer is None
        assert type(loaded).__name__ == type(model).__name__
        assert checkpoint.rank_map(loaded) == result.ranks
        assert decoder_weights(loaded).keys() == decoder_weights(model).keys()
        torch.testing.assert_close(logits(loaded, ids), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("order", ["middle-out", "front-to-back"])
def test_sequential_changes_exactly_the_layers_above_a_compressed_one(order):
    """Same (uniform) ranks; sequential statistics differ from dense ones only for a layer that has
    an already-compressed layer below it."""
    seq_model, seq_result = run(config(method="vac", allocation="uniform", sequential=True, order=order,
                                       refine="none"))  # the statistics alone
    par_model, par_result = run(config(method="vac", allocation="uniform", sequential=False, order=order))
    assert seq_result.ranks == par_result.ranks
    seq_w, par_w = decoder_weights(seq_model), decoder_weights(par_model)
    differing = {p for p in seq_w if not torch.allclose(seq_w[p], par_w[p], atol=1e-6)}
    if order == "middle-out":  # [1, 0]: layer 1 sees dense layer 0, layer 0 sees embeddings
        assert differing == set()
    else:  # [0, 1]: layer 1 sees the compressed layer 0
        assert differing == {p for p in seq_w if p.startswith("model.layers.1.")}


def test_sequential_order_changes_the_result():
    a, ra = run(config(method="vac", ratio=1.5, order="middle-out"), layers=4)
    b, rb = run(config(method="vac", ratio=1.5, order="front-to-back"), layers=4)
    assert ra.ranks == rb.ranks
    wa, wb = decoder_weights(a), decoder_weights(b)
    differing = {p.split(".")[2] for p in wa if not torch.allclose(wa[p], wb[p], atol=1e-6)}
    # middle-out [2, 3, 1, 0] vs front-to-back [0, 1, 2, 3]: layer 0 sees embeddings in both orders;
    # layers 1, 2 and 3 see different mixes of compressed and dense layers below them
    assert differing == {"1", "2", "3"}
    ids = tokens(2, 20, seed=7)
    assert not torch.allclose(logits(a, ids), logits(b, ids), atol=1e-5)


@pytest.mark.parametrize("order", ["front-to-back", "middle-out", "back-to-front", "3,0,5,1,4,2"])
def test_sequential_passes_counts_the_layer_passes_compress_reruns(order):
    """The search costs an order by ``sequential_passes``: it must count what ``compress`` re-runs."""
    _, result = run(config(method="vac", allocation="uniform", order=order, refine="none"), layers=6)
    assert result.recompute[0] == sequential_passes(layer_order(order, 6))
    assert result.recompute[1] > 0


def test_sequential_passes_grow_quadratically_away_from_front_to_back():
    assert sequential_passes(list(range(30))) == 29  # one pass per layer boundary
    assert sequential_passes(layer_order("back-to-front", 30)) == 29 * 30 // 2
    assert 250 < sequential_passes(layer_order("middle-out", 30)) < 30 * 30 // 2


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_attention_ratio_budget(allocation):
    ratio, attn_ratio = 1.5, 3.0
    model, result = run(config(method="vac", ratio=ratio, attn_ratio=attn_ratio, allocation=allocation))
    arch = arch_for(model)
    matrices = matrices_of(tiny_llama())
    attn = [m for m in matrices if arch.component(m.path) == "attn"]
    attn_before = sum(m.dense_params for m in attn)
    attn_after = sum(m.params(result.ranks.get(m.path, DENSE)) for m in attn)
    attn_budget = int(attn_before / attn_ratio)
    largest_attn_step = max(STEP * (m.out_features + m.in_features) for m in attn)
    assert attn_after <= attn_budget
    assert attn_before / attn_after >= attn_ratio
    if allocation == "global":
        assert attn_budget - attn_after < largest_attn_step
        # the MLP gets the rest of the overall budget, which therefore still holds
        assert result.params_after <= int(result.params_before / ratio)
        assert result.ratio == pytest.approx(ratio, rel=0.05)
    else:
        # uniform: every attention matrix at its own uniform rank for 3x
        for m in attn:
            r = result.ranks[m.path]
            assert m.params(r) <= m.dense_params / attn_ratio < m.params(r + 1)


def test_allocation_curves_carry_no_autograd_graph(monkeypatch):
    import vac.core.allocate as pipeline  # the knapsack the allocations call

    seen = []
    real = pipeline.knapsack

    def spy(matrices, *args, **kw):
        seen.extend(matrices)
        return real(matrices, *args, **kw)

    monkeypatch.setattr(pipeline, "knapsack", spy)
    model = tiny_llama()
    assert all(p.requires_grad for p in model.parameters())  # as loaded by from_pretrained
    compress(model, WINDOWS, config(method="whiten", allocation="global"), progress=False)
    assert len(seen) == 14
    assert not any(m.curve.requires_grad for m in seen)
