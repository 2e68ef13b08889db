"""Tests for vac.core.calibrate: layer streaming, input statistics and the layer-streamed Fisher against
plain whole-model passes."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_llama, tiny_olmo3, tokens

from vac.core.calibrate import InputStats, LayerStream, fisher_stats, layer_input_stats, window_loss
from vac.models.families import arch_for

MODELS = {"llama": tiny_llama, "olmo3": tiny_olmo3}


def streamed_logits(model, ids):
    stream = LayerStream(model)
    with torch.no_grad():
        hidden = stream.embed(ids)
        for i in range(len(stream)):
            hidden = stream.layer(i, hidden, ids)
        return stream.head(hidden)


@pytest.mark.parametrize("family", MODELS)
def test_layer_stream_equals_model(family):
    model = MODELS[family]()
    ids = tokens(3, 24)
    with torch.no_grad():
        expected = model(ids).logits
    logits = streamed_logits(model, ids)
    assert logits.shape == (3, 24, VOCAB)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_layer_stream_sliding_window_matters():
    """The OLMo-3 check above is only meaningful if its sliding-window mask changes the logits."""
    ids = tokens(2, 24)
    windowed = tiny_olmo3()
    full = tiny_olmo3()
    full.config.layer_types = ["full_attention"] * 4
    with torch.no_grad():
        a, b = windowed(ids).logits, full(ids).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-5)  # inside the window: equal
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3
    torch.testing.assert_close(streamed_logits(windowed, ids), a, rtol=0, atol=1e-5)


def test_layer_stream_kwargs_follow_the_batch_shape():
    model = tiny_llama()
    stream = LayerStream(model)
    for ids in (tokens(2, 16), tokens(1, 24), tokens(2, 16, seed=5)):
        with torch.no_grad():
            expected = model(ids).logits
        torch.testing.assert_close(
            stream.head(_run(stream, ids)), expected, rtol=0, atol=1e-5
        )
    assert len(stream._kwargs) == 2  # one recording per shape


def _run(stream, ids):
    with torch.no_grad():
        hidden = stream.embed(ids)
        for i in range(len(stream)):
            hidden = stream.layer(i, hidden, ids)
    return hidden


@pytest.mark.parametrize("family", MODELS)
def test_layer_input_stats_equal_hooked_full_pass(family):
    model = MODELS[family]()
    arch = arch_for(model)
    windows = tokens(6, 20)
    batches = list(windows.split(4))  # 4 + 2: statistics accumulate over batches
    n_layers = len(model.get_submodule(arch.layers))

    # reference: pre-hooks on every linear during plain model calls
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for path in arch.decoder_linears(n_layers):
        def hook(_m, args, path=path):
            seen.setdefault(path, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()

    stream = LayerStream(model)
    with torch.no_grad():
        hidden = [stream.embed(b) for b in batches]
    got: dict[str, InputStats] = {}
    for i in range(n_layers):
        stats, hidden = layer_input_stats(stream, i, hidden, batches)
        got.update(stats)
    assert set(got) == set(arch.decoder_linears(n_layers))
    for path, xs in seen.items():
        x = torch.cat(xs)
        assert x.shape[0] == 6 * 20
        xtx = x.T @ x
        s = got[path]
        assert s.tokens == 6 * 20
        assert s.xtx.dtype == torch.float64
        torch.testing.assert_close(s.xtx, xtx, rtol=0, atol=1e-6 * xtx.abs().max().item())
        torch.testing.assert_close(s.abs_sum, x.abs().sum(0), rtol=1e-6, atol=0)
    # the outputs of the last layer are the final hidden states
    with torch.no_grad():
        final = [model.model(b).last_hidden_state for b in batches]
        norm = model.get_submodule(arch.norm)
    for h, f in zip(hidden, final):
        torch.testing.assert_close(norm(h), f, rtol=0, atol=1e-5)


def test_input_stats_add_chunks_and_accumulates():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5000, 8, generator=g)  # 10000 tokens: three 4096-token chunks
    s = InputStats.empty(8)
    s.add(x[:1])
    s.add(x[1:])
    flat = x.reshape(-1, 8).double()
    assert s.tokens == 10000
    torch.testing.assert_close(s.xtx, flat.T @ flat, rtol=1e-6, atol=1e-6 * 10000)
    torch.testing.assert_close(s.abs_sum, flat.abs().sum(0), rtol=1e-6, atol=0)


def test_window_loss_is_sum_of_window_means():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, VOCAB, generator=g)
    batch = tokens(3, 7)
    expected = sum(
        torch.nn.functional.cross_entropy(logits[k, :-1], batch[k, 1:]) for k in range(3)
    )
    torch.testing.assert_close(window_loss(logits, batch), expected)


@pytest.mark.parametrize("family", MODELS)
def test_fisher_equals_whole_model_backward(family):
    model = MODELS[family]()
    arch = arch_for(model)
    windows = tokens(3, 16, seed=3)
    n_layers = len(model.get_submodule(arch.layers))
    paths = arch.decoder_linears(n_layers)
    flags = [p.requires_grad for p in model.parameters()]

    got = fisher_stats(model, windows, progress=False)

    # restored: requires_grad flags and eval mode
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not model.training

    row = {p: 0.0 for p in paths}
    col = {p: 0.0 for p in paths}
    for k in range(windows.shape[0]):
        w = windows[k : k + 1]
        model.zero_grad(set_to_none=True)
        window_loss(model(w).logits, w).backward()
        for p in paths:
            g2 = model.get_submodule(p).weight.grad.double().square()
            row[p] = row[p] + g2.sum(1)
            col[p] = col[p] + g2.sum(0)
    model.zero_grad(set_to_none=True)

    assert set(got) == set(paths)
    for p in paths:
        assert got[p].windows == 3
        assert got[p].row.shape == (model.get_submodule(p).out_features,)
        assert got[p].row.sum() > 0
        torch.testing.assert_close(got[p].row, row[p], rtol=1e-4, atol=1e-6 * row[p].max().item())
        torch.testing.assert_close(got[p].col, col[p], rtol=1e-4, atol=1e-6 * col[p].max().item())
        assert got[p].row.sum().item() == pytest.approx(got[p].col.sum().item(), rel=1e-9)


def test_fisher_is_not_the_gradient_of_the_summed_loss():
    """One window per pass: the squared gradients of separate windows differ from the square of the
    batch gradient, so a batched backward would give different numbers."""
    model = tiny_llama()
    windows = tokens(2, 16, seed=3)
    path = "model.layers.0.mlp.down_proj"
    got = fisher_stats(model, windows, progress=False)[path]
    model.zero_grad(set_to_none=True)
    window_loss(model(windows).logits, windows).backward()
    batched = model.get_submodule(path).weight.grad.double().square().sum(1)
    model.zero_grad(set_to_none=True)
    assert not torch.allclose(got.row, batched, rtol=1e-2)


@pytest.mark.parametrize("family", MODELS)
def test_fisher_gathers_input_stats_of_its_windows(family):
    """``fisher_stats(inputs=...)`` gathers, from its forward passes only (not the recomputations in
    the backward), the same input statistics that a layer-streamed pass over those windows gives."""
    model = MODELS[family]()
    arch = arch_for(model)
    windows = tokens(3, 16, seed=3)
    n_layers = len(model.get_submodule(arch.layers))
    inputs: dict[str, InputStats] = {}
    plain = fisher_stats(model, windows, progress=False)
    with_inputs = fisher_stats(model, windows, progress=False, inputs=inputs)
    for p in plain:  # gathering inputs does not change the Fisher
        torch.testing.assert_close(with_inputs[p].row, plain[p].row, rtol=0, atol=0)
    # every hook is removed again
    assert all(not m._forward_pre_hooks for m in model.modules())

    stream = LayerStream(model)
    batches = list(windows.split(2))
    with torch.no_grad():
        hidden = [stream.embed(b) for b in batches]
    expected: dict[str, InputStats] = {}
    for i in range(n_layers):
        stats, hidden = layer_input_stats(stream, i, hidden, batches)
        expected.update(stats)
    assert set(inputs) == set(expected) == set(arch.decoder_linears(n_layers))
    for path, e in expected.items():
        assert inputs[path].tokens == e.tokens == 3 * 16  # counted once, not again in the backward
        torch.testing.assert_close(inputs[path].xtx, e.xtx, rtol=0, atol=1e-6 * e.xtx.abs().max().item())
        torch.testing.assert_close(inputs[path].abs_sum, e.abs_sum, rtol=1e-6, atol=0)
    layer = arch.layer_path(0)
    assert inputs[f"{layer}.self_attn.q_proj"] is inputs[f"{layer}.self_attn.k_proj"]
