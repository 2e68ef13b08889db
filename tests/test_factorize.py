"""Tests for vac.core.methods: every method's weighting on real statistics of a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tokens

from vac.config import CompressConfig
from vac.core.driver import dense_statistics
from vac.core.methods import (
    METHODS,
    Weighting,
    cholesky_adaptive,
    decompose,
    tail_energy,
    weighting,
)

PATHS = [
    "model.layers.0.self_attn.q_proj",  # 64 x 64
    "model.layers.1.self_attn.k_proj",  # 32 x 64
    "model.layers.0.mlp.gate_proj",  # 160 x 64
    "model.layers.1.mlp.down_proj",  # 64 x 160
]


@pytest.fixture(scope="module")
def calibrated(one_thread):
    model = tiny_llama()
    # not sequential: input statistics over all 8 windows (256 tokens > 160 input channels)
    cfg = CompressConfig.of(method="vac", fisher_windows=4, batch_size=4, seq_len=32, calib_windows=8, sequential=False)
    stats = dense_statistics(model, tokens(8, 32), cfg, progress=False)
    return model, stats


def weight_and_weighting(calibrated, method, path):
    model, stats = calibrated
    weight = model.get_submodule(path).weight.detach()
    return weight, weighting(method, stats.inputs[path], stats.fisher[path])


def test_statistics_cover_every_linear(calibrated):
    model, stats = calibrated
    assert set(stats.fisher) == set(stats.inputs)
    assert len(stats.inputs) == 2 * 7
    for path in PATHS:
        assert stats.inputs[path].tokens == 8 * 32
        assert stats.fisher[path].windows == 4
        assert stats.fisher[path].row.min() > 0
    # q/k/v share one input statistics object, gate/up another
    assert stats.inputs["model.layers.0.self_attn.q_proj"] is stats.inputs["model.layers.0.self_attn.v_proj"]
    assert stats.inputs["model.layers.0.mlp.gate_proj"] is stats.inputs["model.layers.0.mlp.up_proj"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", PATHS)
def test_full_rank_reproduces_weight(calibrated, method, path):
    weight, w = weight_and_weighting(calibrated, method, path)
    u, s, vh = decompose(weight, w)
    full = min(weight.shape)
    up, down = w.factors(u, s, vh, full)
    assert up.shape == (weight.shape[0], full) and down.shape == (full, weight.shape[1])
    scale = weight.abs().max().item()
    torch.testing.assert_close(up @ down, weight.double(), rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", PATHS)
def test_weighted_error_is_tail_energy(calibrated, method, path):
    weight, w = weight_and_weighting(calibrated, method, path)
    u, s, vh = decompose(weight, w)
    tail = tail_energy(s)
    full = min(weight.shape)
    assert tail.shape == (full + 1,)
    errors = []
    for rank in range(full + 1):
        up, down = w.factors(u, s, vh, rank)
        errors.append(w.apply(weight.double() - up @ down).square().sum().item())
    errors = torch.tensor(errors, dtype=torch.float64)
    total = w.apply(weight).square().sum()
    assert errors[0] == pytest.approx(total.item(), rel=1e-12)
    torch.testing.assert_close(errors, tail, rtol=0, atol=1e-9 * total.item())
    assert (errors.diff() <= 1e-9 * total).all()  # monotone in the rank
    assert errors[full // 2] < 0.9 * errors[0]  # and really decreasing


def test_method_weightings_have_the_documented_shapes(calibrated):
    model, stats = calibrated
    path = "model.layers.1.mlp.down_proj"
    inp, fis = stats.inputs[path], stats.fisher[path]
    assert weighting("svd", inp, fis).left is None and weighting("svd", inp, fis).right is None
    fw = weighting("fwsvd", inp, fis, fisher_exponent=0.5)
    assert fw.right is None and fw.left.shape == (64,) and fw.left.square().mean() == pytest.approx(1.0)
    torch.testing.assert_close(fw.left.square() / fw.left.square().sum(), fis.row / fis.row.sum())
    asvd = weighting("asvd", inp, fis, asvd_alpha=1.0)
    assert asvd.left is None and asvd.right.shape == (160,)
    torch.testing.assert_close(asvd.right / asvd.right.sum(), inp.abs_sum / inp.abs_sum.sum())
    wh = weighting("whiten", inp, fis)
    assert wh.left is None and wh.ridge == 0.0
    torch.testing.assert_close(wh.right @ wh.right.T, inp.xtx / inp.tokens)
    vac = weighting("vac", inp, fis)
    torch.testing.assert_close(vac.right, wh.right)
    assert vac.left.shape == (64,) and (vac.left > 0).all()
    with pytest.raises(ValueError, match="unknown method"):
        weighting("nope", inp, fis)


# --- whitening on a singular covariance ------------------------------------------------------------

def test_cholesky_adaptive_rank_deficient_covariance():
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xtx = x.T @ x  # rank 3 of 16
    assert torch.linalg.matrix_rank(xtx).item() == 3
    factor, ridge = cholesky_adaptive(xtx)
    assert ridge > 0
    assert torch.isfinite(factor).all() and factor.diagonal().min() > 0
    scale = xtx.diagonal().mean()
    torch.testing.assert_close(factor @ factor.T, xtx + ridge * scale * torch.eye(16, dtype=torch.float64))
    # the factor works as a whitening transform: full rank still reproduces a weight
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    w = Weighting(right=factor, ridge=ridge)
    up, down = w.factors(*decompose(weight, w), 8)
    torch.testing.assert_close(up @ down, weight.double(), rtol=0, atol=1e-6)


def test_cholesky_adaptive_full_rank_needs_no_ridge():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    factor, ridge = cholesky_adaptive(x.T @ x)
    assert ridge == 0.0
    torch.testing.assert_close(factor @ factor.T, x.T @ x)


def test_cholesky_adaptive_zero_matrix():
    factor, ridge = cholesky_adaptive(torch.zeros(16, 16))
    assert ridge > 0
    assert factor.dtype == torch.float64
    assert torch.isfinite(factor).all() and factor.diagonal().min() > 0


# --- whitening is optimal for the output error ------------------------------------------------------

def output_error(weight, approx, xtx):
    """‖(W − W′) Xᵀ‖²_F = tr((W − W′) XᵀX (W − W′)ᵀ)."""
    e = weight.double() - approx
    return torch.einsum("oi,ij,oj->", e, xtx, e).item()


@pytest.mark.parametrize("path", PATHS)
def test_whiten_minimizes_output_error(calibrated, path):
    model, stats = calibrated
    weight = model.get_submodule(path).weight.detach()
    inp = stats.inputs[path]
    xtx = inp.xtx
    ws = {m: weighting(m, inp, stats.fisher[path]) for m in ("svd", "asvd", "whiten")}
    assert ws["whiten"].ridge == 0.0  # 256 tokens: the covariance is full rank
    svds = {m: decompose(weight, w) for m, w in ws.items()}
    tail = tail_energy(svds["whiten"][1])
    for rank in (1, 4, 12, 24):
        err = {m: output_error(weight, ws[m].factors(*svds[m], rank)[0] @ ws[m].factors(*svds[m], rank)[1], xtx)
               for m in ws}
        # whitening's weighted error is exactly the output error per token
        assert err["whiten"] == pytest.approx(inp.tokens * tail[rank].item(), rel=1e-8)
        assert err["whiten"] <= err["svd"] * (1 + 1e-9)
        assert err["whiten"] <= err["asvd"] * (1 + 1e-9)
    # on random weights the gain is modest but real at a mid rank
    rank = 12
    f_svd = ws["svd"].factors(*svds["svd"], rank)
    f_wh = ws["whiten"].factors(*svds["whiten"], rank)
    assert output_error(weight, f_wh[0] @ f_wh[1], xtx) < 0.999 * output_error(weight, f_svd[0] @ f_svd[1], xtx)


def test_correction_fits_dense_outputs_from_compressed_inputs():
    """With the cross term, the factorization fits W·X_dense from the perturbed inputs X̃: its error
    against the dense outputs is below plain whitening's at every rank, and it equals whitening
    when the inputs are unperturbed."""
    from vac.core.calibrate import InputStats
    from vac.core.methods import decompose, weighting

    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 10, generator=g, dtype=torch.float64)
    x_dense = torch.randn(200, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 10, generator=g, dtype=torch.float64)
    x_pert = x_dense + 0.3 * torch.randn(200, 10, generator=g, dtype=torch.float64)

    same = InputStats.empty(10)
    same.add_pair(x_dense, x_dense)
    plain = InputStats.empty(10)
    plain.add(x_dense)
    for rank in (3, 6):
        a = weighting("whiten", same, None)
        b = weighting("whiten", plain, None)
        up_a, down_a = a.factors(*decompose(w, a), rank)
        up_b, down_b = b.factors(*decompose(w, b), rank)
        assert torch.allclose(up_a @ down_a, up_b @ down_b, atol=1e-4)

    paired = InputStats.empty(10)
    paired.add_pair(x_pert, x_dense)
    unpaired = InputStats.empty(10)
    unpaired.add(x_pert)
    target = x_dense.float() @ w.float().T
    for rank in (2, 5, 8, 10):
        errors = []
        for stats in (paired, unpaired):
            wt = weighting("whiten", stats, None)
            up, down = wt.factors(*decompose(w, wt), rank)
            errors.append((x_pert @ (up @ down).T - target.double()).norm().item())
        assert errors[0] < errors[1]
