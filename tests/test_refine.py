"""Refinement of factorized layers (vac.core.refine): lowers the calibration error, never raises it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tokens

from vac.config import CompressConfig
from vac.core.calibrate import LayerStream
from vac.core.driver import compress
from vac.core.evaluate import perplexity
from vac.core.refine import factor_parameters, layer_error, refine_layer
from vac.errors import VacError
from vac.models.layers import factorize_

RANKS = {f"model.layers.0.{name}": 8 for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj",
                                                   "mlp.down_proj")}


def _setup():
    model = tiny_llama(layers=2)
    stream = LayerStream(model)
    batches = list(tokens(8, 32).split(4))
    with torch.no_grad():
        inputs = [stream.embed(b) for b in batches]
        targets = [stream.layer(0, x, b) for x, b in zip(inputs, batches)]
    factorize_(model, RANKS)  # plain SVD at rank 8: a large error to fit
    return model, stream, inputs, targets, batches


def test_refinement_lowers_the_layer_error_on_its_calibration_inputs(one_thread):
    torch.manual_seed(0)
    model, stream, inputs, targets, batches = _setup()
    start = layer_error(stream, 0, inputs, targets, batches)
    done = refine_layer(stream, 0, inputs, targets, batches, steps=40, lr=1e-2)
    assert done.kept and done.before == pytest.approx(start, rel=1e-12)
    assert done.after == pytest.approx(layer_error(stream, 0, inputs, targets, batches), rel=1e-12)
    assert done.after < 0.7 * done.before, (done.before, done.after)
    assert 1e-4 < done.before < 1  # the rank-8 SVD error is real, and relative to the target's energy
    assert all(p.requires_grad for p in model.parameters())  # its flags as they were (tiny_llama: all on)
    assert all(p.grad is None for p in model.parameters())


def test_a_fit_that_does_not_help_is_undone(one_thread):
    """A learning rate far too large makes the fit worse: the factors are put back exactly."""
    torch.manual_seed(0)
    model, stream, inputs, targets, batches = _setup()
    before = [p.detach().clone() for p in factor_parameters(stream.layers[0])]
    start = layer_error(stream, 0, inputs, targets, batches)
    done = refine_layer(stream, 0, inputs, targets, batches, steps=5, lr=10.0)
    assert not done.kept and done.after == done.before == pytest.approx(start, rel=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(before, factor_parameters(stream.layers[0])))
    assert layer_error(stream, 0, inputs, targets, batches) == pytest.approx(start, rel=1e-12)


@pytest.mark.parametrize("target", ["own", "dense"])
def test_refined_compression_has_lower_calibration_loss(one_thread, target):
    """The whole driver: refined layers give a lower calibration PPL than the same factorization unrefined."""
    ids = tokens(8, 32)
    base = dict(method="whiten", sequential=True, ratio=2.5, rank_step=4, rank_floor=4, calib_windows=8,
                seq_len=32, batch_size=4)
    plain, refined = tiny_llama(layers=3), tiny_llama(layers=3)
    compress(plain, ids, CompressConfig.of(**base), progress=False)
    compress(refined, ids, CompressConfig.of(**base, refine=target, refine_steps=30, refine_lr=3e-3), progress=False)
    p, r = (perplexity(m, ids, progress=False)["ppl"] for m in (plain, refined))
    assert r < p, (p, r)


def test_refine_settings_are_checked():
    with pytest.raises(VacError, match="unknown refine target 'all'"):
        CompressConfig.of(refine="all")
    with pytest.raises(VacError, match="--refine own needs --sequential"):
        CompressConfig.of(method="whiten", refine="own").resolved()
    with pytest.raises(VacError, match="do not combine"):
        CompressConfig.of(method="vac", refine="own", correct=True).resolved()
    with pytest.raises(VacError, match="--refine-lr must be positive"):
        CompressConfig.of(refine_lr=0)
