"""Distillation: loss normalization, parameter groups, data mixing, teacher cache, resume, torchrun."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from conftest import VOCAB, tiny_llama, tiny_tokenizer, tokens

from vac import checkpoint
from vac.errors import VacError
from vac.models.layers import factorize_
from vac.recover.data import DataMix, Samples, builtin_chat, check_no_overlap, read_chat_jsonl, render_chat
from vac.recover.distill import (
    DistillConfig,
    fill_teacher_cache,
    freeze_,
    load_snapshot,
    lr_lambda,
    param_groups,
    run_distill,
)

from vac.recover.loss import combine, head_kd_loss, kd_loss, kd_sums, top_logits

SEQ = 16


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: faster on a shared CPU and the same arithmetic as a torchrun process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def student_of(teacher_seed=0, rank=8, **kw):
    """The teacher ``tiny_llama(teacher_seed, **kw)`` with q, o, up and down factorized by SVD."""
    ranks = {f"model.layers.{i}.{n}": rank for i in range(2)
             for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}
    return factorize_(tiny_llama(seed=teacher_seed, **kw), ranks)


def mix_of(seed=1):
    """Random text windows plus right-padded 'chat' samples (padding not scored)."""
    text = Samples.windows(tokens(24, SEQ, seed=3))
    ids = tokens(6, SEQ, seed=4)
    lengths = torch.tensor([5, 9, 16, 7, 12, 3])
    mask = torch.arange(SEQ)[None, :] < lengths[:, None]
    return DataMix(text, Samples(ids.masked_fill(~mask, 0), mask), chat_fraction=0.25, seed=seed)


def config(**kw):
    base = dict(steps=6, seq_len=SEQ, batch_size=4, grad_accum=2, lr=2e-3, attn_lr_mult=5.0, warmup=2,
                save_every=2, alpha=0.7, temperature=2.0)
    return DistillConfig(**(base | kw))


def weights(folder):
    model, _ = checkpoint.load(folder)
    return model.state_dict()


# ----------------------------------------------------------------------------- loss


def test_loss_is_per_token_mean_hand_computed():
    ln2 = math.log(2)
    # prediction positions: row 0 has 2 scored positions (+1 masked), row 1 has 1 scored (+2 masked)
    student = torch.tensor([[[0.0, ln2], [0.0, 0.0], [9.0, -9.0]],
                            [[0.0, ln2], [5.0, 0.0], [0.0, 5.0]]])
    teacher = torch.tensor([[[ln2, 0.0], [0.0, 0.0], [-9.0, 9.0]],
                            [[0.0, ln2], [0.0, 5.0], [5.0, 0.0]]])
    targets = torch.tensor([[1, 0, 0], [1, 1, 1]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # T = 1: p = (2/3, 1/3), q = (1/3, 2/3) → KL = ln2/3; the other scored positions have KL 0
    kl = [ln2 / 3, 0.0, 0.0]
    nll = [-math.log(2 / 3), ln2, -math.log(2 / 3)]
    loss, kl_mean, nll_mean = kd_loss(student, targets, mask, temperature=1.0, alpha=0.25, teacher_logits=teacher)
    assert kl_mean.item() == pytest.approx(sum(kl) / 3, rel=1e-6)
    assert nll_mean.item() == pytest.approx(sum(nll) / 3, rel=1e-6)
    assert loss.item() == pytest.approx(0.25 * sum(kl) / 3 + 0.75 * sum(nll) / 3, rel=1e-6)
    # T = 2: p = (√2, 1)/(1+√2), q = (1, √2)/(1+√2) → KL = (p0 − p1)·ln√2; the loss carries T² = 4
    r = math.sqrt(2)
    kl2 = (r - 1) / (r + 1) * ln2 / 2
    loss, kl_mean, _ = kd_loss(student, targets, mask, temperature=2.0, alpha=0.5, teacher_logits=teacher)
    assert kl_mean.item() == pytest.approx(kl2 / 3, rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * 4 * kl2 / 3 + 0.5 * sum(nll) / 3, rel=1e-6)
    # repeating the batch changes nothing: a mean per token, not a sum over positions
    loss_twice, _, _ = kd_loss(student.repeat(2, 1, 1), targets.repeat(2, 1), mask.repeat(2, 1),
                               temperature=2.0, alpha=0.5, teacher_logits=teacher.repeat(2, 1, 1))
    assert loss_twice.item() == pytest.approx(loss.item(), rel=1e-6)


def test_topk_kl_on_renormalized_support():
    student = torch.tensor([[[0.0, 1.0, 5.0]]])
    values, indices = torch.tensor([[[2.0, 1.0]]]), torch.tensor([[[0, 1]]])  # teacher top-2 of (2, 1, 0)
    e = math.e
    p = [e**2 / (e**2 + e), e / (e**2 + e)]
    q = [1 / (1 + e), e / (1 + e)]  # student restricted to tokens {0, 1} and renormalized
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    _, kl_mean, nll_mean = kd_loss(student, torch.tensor([[2]]), torch.tensor([[True]]),
                                   teacher_topk=(values, indices))
    assert kl_mean.item() == pytest.approx(kl, rel=1e-6)
    assert nll_mean.item() == pytest.approx(-math.log(e**5 / (1 + e + e**5)), rel=1e-5)  # full softmax


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for the backward pass of ``fn()`` (views of one
    storage counted once), and fn's result."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


@pytest.mark.parametrize("head_kind", ["dense", "factorized", "soft-capped"])
@pytest.mark.parametrize("teacher_kind", ["full", "topk"])
def test_head_loss_equals_the_whole_loss_and_keeps_no_logits(teacher_kind, head_kind):
    """head_kd_loss on hidden states = kd_sums on the head's whole logits (values and gradients, to the
    hidden states and the head's parameters), and nothing of the size of the logits is kept for the
    backward pass."""
    from vac.checkpoint.hf.modeling_vac import LowRankLinear

    g = torch.Generator().manual_seed(0)
    b, positions, width, vocab = 2, 40, 24, 512
    torch.manual_seed(0)
    head = (LowRankLinear(width, vocab, 6, bias=True) if head_kind == "factorized"
            else nn.Linear(width, vocab, bias=True))
    cap = 2.0 if head_kind == "soft-capped" else None  # Gemma's final_logit_softcapping
    teacher_head = nn.Linear(width, vocab, bias=False)
    hidden = torch.randn(b, positions, width, generator=g, requires_grad=True)
    teacher_hidden = torch.randn(b, positions, width, generator=g)
    targets = torch.randint(0, vocab, (b, positions), generator=g)
    mask = torch.ones(b, positions, dtype=torch.bool)
    mask[1, 30:] = False  # a padded tail, as chat samples have
    teacher = teacher_head(teacher_hidden).detach()
    topk = teacher.topk(64, dim=-1)
    params = [hidden, *head.parameters()]

    def grads():
        out = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return out

    kw = {"teacher_logits": teacher} if teacher_kind == "full" else {"teacher_topk": topk}
    logits = head(hidden) if cap is None else cap * torch.tanh(head(hidden) / cap)
    kl, nll, n = kd_sums(logits, targets, mask, 2.0, **kw)
    combine(kl, nll, n, 2.0, 0.25).backward()
    whole = grads()
    kw = {"teacher_hidden": teacher_hidden, "teacher_head": teacher_head} if teacher_kind == "full" else {
        "teacher_topk": topk}
    saved, (loss, kl2, nll2, n2) = _saved_bytes(lambda: head_kd_loss(
        hidden, head, targets, mask, 2.0, 0.25 * 4.0 / 70, 0.75 / 70, chunk=16, softcap=cap, **kw))
    loss.backward()
    fused = grads()
    assert n2 == n == 70
    assert kl2.item() == pytest.approx(kl.item(), rel=1e-6) and nll2.item() == pytest.approx(nll.item(), rel=1e-6)
    assert loss.item() == pytest.approx(combine(kl, nll, n, 2.0, 0.25).item(), rel=1e-6)
    for a, c in zip(fused, whole):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)
    # kept for the backward pass: the gradients (hidden states, the head's linear) and the gather's
    # inputs, never [70, vocab] logits
    assert saved < 70 * vocab * 4, saved


def test_top_logits_per_chunk_are_the_whole_logits_top_k():
    g = torch.Generator().manual_seed(2)
    head = nn.Linear(16, 300, bias=False)
    hidden = torch.randn(2, 21, 16, generator=g)
    for cap in (None, 3.0):
        logits = head(hidden) if cap is None else 3.0 * torch.tanh(head(hidden) / 3.0)
        values, indices = top_logits(hidden, head, 8, chunk=5, softcap=cap)
        whole = logits.detach().topk(8, dim=-1)
        assert torch.equal(indices, whole.indices) and torch.allclose(values, whole.values, atol=1e-6)


def test_head_loss_follows_autocast():
    """Under bf16 autocast the logits are computed in bf16 (as the head itself would be): the sums
    differ from fp32's by rounding only, and the gradient keeps the parameter's dtype."""
    g = torch.Generator().manual_seed(1)
    head = nn.Linear(16, 128, bias=False)
    hidden = torch.randn(1, 12, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 128, (1, 12), generator=g)
    mask = torch.ones(1, 12, dtype=torch.bool)
    topk = torch.randn(1, 12, 128, generator=g).topk(8, dim=-1)
    exact = head_kd_loss(hidden, head, targets, mask, 1.0, 0.5, 0.5, teacher_topk=topk, chunk=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head_kd_loss(hidden, head, targets, mask, 1.0, 0.5, 0.5, teacher_topk=topk, chunk=5)
    assert low[0].item() != exact[0].item() and low[0].item() == pytest.approx(exact[0].item(), rel=2e-2)
    low[0].backward()
    assert head.weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32


# ----------------------------------------------------------------------------- parameter groups


def test_param_groups_learning_rates():
    model = factorize_(tiny_llama(tie=False), {
        "model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.k_proj": 4,
        "model.layers.0.mlp.down_proj": 8, "model.layers.1.mlp.gate_proj": 8, "lm_head": 16,
    })
    cfg = DistillConfig(lr=1e-3, attn_lr_mult=10.0)
    classes = freeze_(model, cfg)
    lr_of = {id(p): g["lr"] for g in param_groups(model, classes, cfg) for p in g["params"]}
    params = dict(model.named_parameters())

    def lr(name):
        return lr_of.get(id(params[name]))

    assert lr("model.layers.0.self_attn.q_proj.down.weight") == pytest.approx(1e-2)
    assert lr("model.layers.0.self_attn.k_proj.up.weight") == pytest.approx(1e-2)
    assert lr("model.layers.1.self_attn.q_proj.weight") == pytest.approx(1e-2)  # dense attention linear
    assert lr("model.layers.0.mlp.down_proj.up.weight") == pytest.approx(1e-3)
    assert lr("model.layers.0.mlp.up_proj.weight") == pytest.approx(1e-3)  # dense MLP linear
    assert lr("lm_head.down.weight") == pytest.approx(1e-3)  # a factorized head trains at the base lr
    for frozen in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert lr(frozen) is None and not params[frozen].requires_grad
    assert set(classes.values()) == {"attn", "mlp", "head", "norms", "embeddings"}

    cfg = DistillConfig(lr=1e-3, train_norms=True, train_embeddings=True)
    classes = freeze_(model, cfg)
    lr_of = {id(p): g["lr"] for g in param_groups(model, classes, cfg) for p in g["params"]}
    assert lr("model.embed_tokens.weight") == pytest.approx(1e-3)
    assert lr("model.layers.1.post_attention_layernorm.weight") == pytest.approx(1e-3)
    assert all(p.requires_grad for p in model.parameters())


def test_schedule_warmup_then_cosine():
    cfg = DistillConfig(warmup=4, min_lr_ratio=0.1)
    f = lr_lambda(cfg, {"steps": 14})
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(14) == pytest.approx(0.1) and f(20) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- data


def test_time_budget_is_fitted_without_the_first_step_then_refitted():
    from vac.recover.distill import _planned_steps

    cfg = DistillConfig(steps=1000, max_minutes=1.0)
    # a first step of 10 s, then 5 of 2 s: 40 s left at 2 s per step
    assert _planned_steps(cfg, step=6, seconds=20.0, timed_from=10.0, timed_steps=5) == 6 + 20
    assert _planned_steps(DistillConfig(steps=15, max_minutes=1.0), 6, 20.0, 10.0, 5) == 15  # the step cap
    assert _planned_steps(cfg, step=6, seconds=70.0, timed_from=10.0, timed_steps=5) == 6  # over the budget
    # a refit times only the steps since the last fit: 18 steps of 1 s after the 20 s above, 22 s left
    assert _planned_steps(cfg, step=24, seconds=38.0, timed_from=20.0, timed_steps=18) == 24 + 22


def test_a_budgeted_run_fits_its_schedule_and_ends_at_the_final_lr(tmp_path):
    """Under --max-minutes the schedule is fitted at the run's step 6 and refitted every 24 steps; a
    budget all steps fit in ends the cosine at --steps: the last step's lr is min_lr_ratio × lr."""
    cfg = config(steps=40, max_minutes=60.0, grad_accum=1, save_every=100)
    result = run_distill(student_of(), tiny_llama(seed=0), mix_of(), cfg, tmp_path / "out", progress=False)
    curve = result.report["loss_curve"]
    assert len(curve) == 40 and curve[-1]["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-6)


def test_mix_is_deterministic_and_mixes_chat():
    mix = mix_of()
    a, ma = mix.batch(10, 8)
    b, mb = mix_of().batch(10, 8)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    ids, mask = mix.batch(0, mix.epoch_len)
    assert mix.n_chat_epoch == 8 and mix.epoch_len == 32  # 24 windows, 25% chat → 8 chat samples
    rows = {tuple(r.tolist()) for r in ids}
    assert all(tuple(w.tolist()) in rows for w in mix.text.ids)  # every window once per epoch
    assert (~mask).any(dim=1).sum() == 7  # chats 0..7 mod 6; all but chat 2 (16 tokens) are padded


def test_builtin_chat_is_derived_from_text():
    text = ("It was a bright cold day in April. The clocks were striking thirteen. "
            "Winston Smith slipped quickly through the doors. A swirl of gritty dust entered with him. "
            "The hallway smelt of boiled cabbage and old rag mats. At one end a poster was tacked to the wall.")
    convs = builtin_chat([("shakespeare/hamlet", text)], n=4)
    assert convs == builtin_chat([("shakespeare/hamlet", text)], n=4)
    user, assistant = convs[0]
    assert user["content"] == "Continue this passage: It was a bright cold day in April. The clocks were striking thirteen."
    assert assistant["content"].startswith("<think>The passage is from Shakespeare's Hamlet;")
    assert assistant["content"].endswith(
        "</think> Winston Smith slipped quickly through the doors. A swirl of gritty dust entered with him.")


def test_chat_jsonl_rendered_with_the_template(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]}\n'
                    '\n{"messages": [{"role": "user", "content": "w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16"}]}\n')
    convs = read_chat_jsonl(path)
    tok = tiny_tokenizer()
    with pytest.raises(VacError, match="chat template"):
        render_chat(tok, convs, SEQ)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} <eos> {% endfor %}"
    samples = render_chat(tok, convs, 8)
    assert samples.ids[0].tolist() == [3, 4, 1, 5, 1, 1, 1, 1]  # w1 w2 <eos> w3 <eos>, then padding
    assert samples.mask[0].tolist() == [True] * 5 + [False] * 3
    assert samples.mask[1].all()  # truncated to the window
    # a conversation rendered already (as `vac self-text` writes it) is taken verbatim, not templated again
    path.write_text('{"text": "w1 w2 <eos> w3 <eos>"}\n')
    assert read_chat_jsonl(path) == ["w1 w2 <eos> w3 <eos>"]
    assert render_chat(tok, read_chat_jsonl(path), 8).ids.tolist() == samples.ids[:1].tolist()
    path.write_text('{"text": 3}\n')
    with pytest.raises(VacError, match="chat.jsonl:1 needs"):
        read_chat_jsonl(path)


def test_training_data_must_not_overlap_eval():
    check_no_overlap("web-bible:calib+shakespeare:calib", "austen:eval")
    for bad in ("austen:eval", "austen", "shakespeare:calib+austen"):
        with pytest.raises(VacError, match="overlaps"):
            check_no_overlap(bad, "austen:eval")


# ----------------------------------------------------------------------------- training


def test_few_steps_lower_the_kl(tmp_path):
    peaked = dict(initializer_range=0.1)  # default-initialized tiny models are nearly uniform
    teacher = tiny_llama(seed=0, **peaked)
    student = student_of(rank=4, **peaked)
    held = tokens(4, SEQ, seed=11)

    def kl_now():
        with torch.no_grad():
            s, t = student(held).logits[:, :-1], teacher(held).logits[:, :-1]
        return kd_loss(s, held[:, 1:], torch.ones_like(held[:, 1:], dtype=torch.bool), teacher_logits=t)[1].item()

    before = kl_now()
    mix = DataMix(Samples.windows(tokens(16, SEQ, seed=5)))
    cfg = config(steps=12, alpha=1.0, temperature=1.0, lr=1e-3, attn_lr_mult=10.0, save_every=100)
    result = run_distill(student, teacher, mix, cfg, tmp_path / "out", progress=False)
    after = kl_now()
    assert after < 0.8 * before, (before, after)
    report = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert report["steps"] == 12 and report["tokens"] == 12 * 4 * SEQ and len(report["loss_curve"]) == 12
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert result.report["loss_curve"][-1]["kl"] < result.report["loss_curve"][0]["kl"]


class Crash(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    teacher, held = tiny_llama(seed=0), tokens(2, SEQ, seed=9)
    cfg = config()
    full = run_distill(student_of(), teacher, mix_of(), cfg, tmp_path / "a", eval_windows=held, progress=False)

    def crash_at_5(step, record):
        if step == 5:
            raise Crash
    with pytest.raises(Crash):
        run_distill(student_of(), teacher, mix_of(), cfg, tmp_path / "b", eval_windows=held, progress=False,
                    on_step=crash_at_5)
    assert json.loads((tmp_path / "b" / "resume" / "progress.json").read_text())["step"] == 4
    with pytest.raises(VacError, match="lr="):  # another command does not silently resume
        run_distill(student_of(), teacher, mix_of(), config(lr=1e-3), tmp_path / "b", progress=False)
    resumed = run_distill(student_of(), teacher, mix_of(), cfg, tmp_path / "b", eval_windows=held, progress=False)

    assert resumed.report["loss_curve"] == [
        {**r, "seconds": resumed.report["loss_curve"][i]["seconds"]} for i, r in enumerate(full.report["loss_curve"])
    ]
    assert resumed.report["ppl_before"] == full.report["ppl_before"]
    assert resumed.report["ppl_after"] == full.report["ppl_after"]
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "b" / "resume").exists()
    with pytest.raises(VacError, match="finished"):
        run_distill(student_of(), teacher, mix_of(), cfg, tmp_path / "b", progress=False)


def test_snapshots_hold_the_trained_parameters_at_their_step(tmp_path):
    """Every snapshot_every steps the trainable parameters go to the snapshots folder (outside --out);
    the last one loaded into the starting student gives the saved result, the first one does not."""
    teacher, held = tiny_llama(seed=0), tokens(2, SEQ, seed=9)
    with pytest.raises(VacError, match="--snapshots"):
        run_distill(student_of(), teacher, mix_of(), config(snapshot_every=2), tmp_path / "a", progress=False)
    with pytest.raises(VacError, match="inside --out"):
        run_distill(student_of(), teacher, mix_of(), config(snapshot_every=2), tmp_path / "a", progress=False,
                    snapshots=tmp_path / "a" / "snaps")
    done = run_distill(student_of(), teacher, mix_of(), config(snapshot_every=2), tmp_path / "a", progress=False,
                       snapshots=tmp_path / "snaps", eval_windows=held)
    files = sorted(p.name for p in (tmp_path / "snaps").iterdir())
    assert files == ["step-000002.safetensors", "step-000004.safetensors", "step-000006.safetensors"]
    net = student_of()
    trained = {n for n, p in done.model.named_parameters() if "_proj" in n}
    assert load_snapshot(net, tmp_path / "snaps" / files[-1]) == 6
    final = weights(tmp_path / "a")
    for name, p in net.named_parameters():
        assert torch.equal(p, final[name]), name
    assert any(not torch.equal(dict(student_of().named_parameters())[n], dict(net.named_parameters())[n])
               for n in trained)  # the factors did move
    load_snapshot(net, tmp_path / "snaps" / files[0])
    assert not all(torch.equal(p, final[n]) for n, p in net.named_parameters())


def test_activation_checkpointing_recomputes_layers_and_keeps_the_run(tmp_path):
    """--grad-checkpoint: each decoder layer's inside runs twice per micro-batch (forward, then again
    in the backward), and the losses and weights are those of the plain run."""
    teacher = tiny_llama(seed=0)
    runs = {}
    for name, on in (("plain", False), ("ckpt", True)):
        student, calls = student_of(), {"n": 0}
        for layer in student.model.layers:  # a pre-hook inside the layer fires in the recompute too (which stops
            # early, once the last saved tensor is rebuilt: a forward hook on the MLP would not)
            layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        result = run_distill(student, teacher, mix_of(), config(steps=3, grad_checkpoint=on), tmp_path / name,
                             progress=False)
        runs[name] = (result, calls["n"])
    assert runs["plain"][1] == 3 * 2 * 2  # steps × micro-batches × layers
    assert runs["ckpt"][1] == 2 * runs["plain"][1]
    for key in ("loss", "kl", "nll", "grad_norm"):
        assert [r[key] for r in runs["ckpt"][0].report["loss_curve"]] == pytest.approx(
            [r[key] for r in runs["plain"][0].report["loss_curve"]], rel=1e-6), key
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "ckpt")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_teacher_cache_is_a_pass_of_its_own_and_training_never_loads_the_teacher(tmp_path):
    teacher = tiny_llama(seed=0)
    cfg = config(steps=3, top_k=VOCAB)
    live = run_distill(student_of(), teacher, mix_of(), cfg, tmp_path / "live", progress=False)
    filled = fill_teacher_cache(teacher, mix_of(), cfg, tmp_path / "cache", progress=False)
    assert filled["written"] == 3 * cfg.batch_size and filled["already_cached"] == 0 and filled["teacher_loaded"]

    def no_teacher():
        raise AssertionError("the teacher was loaded")
    again = fill_teacher_cache(no_teacher, mix_of(), cfg, tmp_path / "cache", progress=False)
    assert again["written"] == 0 and again["already_cached"] == 12 and not again["teacher_loaded"]
    cached = run_distill(student_of(), no_teacher, mix_of(), cfg, tmp_path / "c1", teacher_cache=tmp_path / "cache",
                         progress=False)
    assert cached.report["teacher_cache"] == {**cached.report["teacher_cache"], "hits": 12, "misses": 0}
    # k = vocabulary: the renormalized top-k KL is the full KL (up to the float16 storage of the logits)
    assert [r["kl"] for r in cached.report["loss_curve"]] == pytest.approx(
        [r["kl"] for r in live.report["loss_curve"]], rel=1e-2, abs=1e-4)
    assert [r["nll"] for r in cached.report["loss_curve"]] == pytest.approx(
        [r["nll"] for r in live.report["loss_curve"]], rel=1e-3)
    # a batch the pass did not cover (a longer run) stops training instead of loading the teacher
    with pytest.raises(VacError, match="has no entry for 2 of this batch's 2 samples"):
        run_distill(student_of(), no_teacher, mix_of(), config(steps=4, top_k=VOCAB), tmp_path / "c2",
                    teacher_cache=tmp_path / "cache", progress=False)
    with pytest.raises(VacError, match="k="):
        run_distill(student_of(), teacher, mix_of(), config(top_k=8), tmp_path / "c3",
                    teacher_cache=tmp_path / "cache", progress=False)


# ----------------------------------------------------------------------------- torchrun

SCRIPT = """
import json, sys, torch
from vac import checkpoint
from vac.recover.distill import DistillConfig, run_distill
from vac.recover.data import DataMix, Samples
text, chat = torch.load(sys.argv[3])
for out, cfg, meta in json.loads(sys.argv[4]):  # one launch, several runs (process start-up is the slow part)
    cfg = DistillConfig(**cfg)
    mix = DataMix(Samples(*text), Samples(*chat), chat_fraction=0.25, seed=1)
    if meta:  # built on meta, each rank loads its shards from the folders
        from vac.recover.distill import shard_model, init_distributed
        from vac.recover.sharded import load_sharded
        env = init_distributed("cpu")
        teacher = lambda: load_sharded(sys.argv[2], lambda m: shard_model(m, cfg), env.device, frozen=True)
        run_distill(sys.argv[1], teacher, mix, cfg, out, progress=False, eval_windows=text[0][:2])
        continue
    student, _ = checkpoint.load(sys.argv[1])
    teacher, _ = checkpoint.load(sys.argv[2])
    run_distill(student, teacher, mix, cfg, out, progress=False, eval_windows=text[0][:2])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(tmp_path):
    """DDP and FSDP2 on 2 gloo processes (1 micro-batch of 2 each) = 1 process (2 micro-batches of 2)."""
    mix, teacher = mix_of(), tiny_llama(seed=0)
    checkpoint.save(student_of(), None, tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    torch.save(((mix.text.ids, mix.text.mask), (mix.chat.ids, mix.chat.mask)), tmp_path / "data.pt")
    runs = [(str(tmp_path / name), config(steps=4, grad_accum=1, fsdp=fsdp).__dict__, meta)
            for name, fsdp, meta in (("ddp", False, False), ("fsdp", True, False), ("fsdp-meta", True, True))]
    # FSDP2 with the MixedPrecisionPolicy, activation checkpointing and the teacher sharded too
    runs.append((str(tmp_path / "fsdp-bf16"), config(steps=4, grad_accum=1, fsdp=True, bf16=True,
                                                     grad_checkpoint=True).__dict__, False))
    (tmp_path / "run.py").write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(tmp_path / "run.py"), str(tmp_path / "student"),
           str(tmp_path / "teacher"), str(tmp_path / "data.pt"), json.dumps(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    student, _ = checkpoint.load(tmp_path / "student")
    one = run_distill(student, teacher, mix, config(steps=4, grad_accum=2), tmp_path / "one", progress=False,
                      eval_windows=mix.text.ids[:2])
    reference = weights(tmp_path / "one")
    for name in ("ddp", "fsdp", "fsdp-meta"):
        two = json.loads((tmp_path / name / "distill.json").read_text())
        assert two["world_size"] == 2 and two["config"]["fsdp"] == (name != "ddp")
        assert two["teacher_sharded"] == (name != "ddp")
        for key in ("ppl_before", "ppl_after"):
            assert two[key]["ppl"] == pytest.approx(one.report[key]["ppl"], rel=1e-5), (name, key)
        for key in ("loss", "kl", "nll", "grad_norm", "lr", "tokens"):  # grad_norm: reductions scaled right
            assert [r[key] for r in two["loss_curve"]] == pytest.approx(
                [r[key] for r in one.report["loss_curve"]], rel=1e-5, abs=1e-7), (name, key)
        trained = weights(tmp_path / name)
        assert trained.keys() == reference.keys()
        shards = sorted(p.name for p in (tmp_path / name).glob("model-*.safetensors"))
        if name != "ddp":  # FSDP2: written a layer at a time, one shard each
            assert shards == ["model-layer-00000.safetensors", "model-layer-00001.safetensors", "model-rest.safetensors"]
        for k in reference:
            torch.testing.assert_close(trained[k], reference[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    # bf16 compute: one process autocasts, two shard with bf16 parameters; same run within bf16 rounding
    mixed = json.loads((tmp_path / "fsdp-bf16" / "distill.json").read_text())
    student, _ = checkpoint.load(tmp_path / "student")
    one_bf16 = run_distill(student, teacher, mix, config(steps=4, grad_accum=2, bf16=True, grad_checkpoint=True),
                           tmp_path / "one-bf16", progress=False)
    assert mixed["config"]["bf16"] and mixed["config"]["grad_checkpoint"] and mixed["world_size"] == 2
    for key in ("loss", "kl", "nll"):
        assert [r[key] for r in mixed["loss_curve"]] == pytest.approx(
            [r[key] for r in one_bf16.report["loss_curve"]], rel=2e-2), key
    assert [r["loss"] for r in mixed["loss_curve"]] != pytest.approx([r["loss"] for r in one.report["loss_curve"]],
                                                                     rel=1e-6)  # bf16 did apply
    trained, ref16 = weights(tmp_path / "fsdp-bf16"), weights(tmp_path / "one-bf16")
    assert {t.dtype for t in trained.values()} == {torch.float32}  # master weights stay fp32
    start = weights(tmp_path / "student")
    moved = {k: (ref16[k] - start[k]).norm() / start[k].norm().clamp_min(1e-12) for k in ref16}
    apart = {k: (trained[k] - ref16[k]).norm() / start[k].norm().clamp_min(1e-12) for k in ref16}
    trained_keys = [k for k in ref16 if moved[k] > 0]
    assert len(trained_keys) == 2 * 11  # the factors and dense linears of both layers trained
    for k in ref16:  # the two bf16 runs differ by under a tenth of how far training moved each weight
        assert apart[k] <= 0.1 * moved[k], (k, float(moved[k]), float(apart[k]))


RESUME = """
import json, sys, torch
from vac import checkpoint
from vac.recover.distill import DistillConfig, run_distill
from vac.recover.data import DataMix, Samples
text, chat = torch.load(sys.argv[3])
student, _ = checkpoint.load(sys.argv[1])
teacher, _ = checkpoint.load(sys.argv[2])
mix = DataMix(Samples(*text), Samples(*chat), chat_fraction=0.25, seed=1)

def stop(step, record):
    if step == 3:  # after the state of step 2 was saved
        raise SystemExit(3)

run_distill(student, teacher, mix, DistillConfig(**json.loads(sys.argv[5])), sys.argv[4], progress=False, on_step=stop)
"""


def test_sharded_state_of_two_ranks_resumes_on_one(tmp_path):
    """FSDP2 on 2 ranks saves a torch.distributed.checkpoint (each rank its shards); one process without
    FSDP resumes from it and ends as the uninterrupted one-process run."""
    mix, teacher = mix_of(), tiny_llama(seed=0)
    checkpoint.save(student_of(), None, tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    torch.save(((mix.text.ids, mix.text.mask), (mix.chat.ids, mix.chat.mask)), tmp_path / "data.pt")
    (tmp_path / "resume.py").write_text(RESUME)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(tmp_path / "resume.py"), str(tmp_path / "student"),
           str(tmp_path / "teacher"), str(tmp_path / "data.pt"), str(tmp_path / "run"),
           json.dumps(config(steps=4, grad_accum=1, fsdp=True).__dict__)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0  # stopped at step 3
    state = tmp_path / "run" / "resume"
    assert json.loads((state / "progress.json").read_text())["step"] == 2
    assert (state / "dcp" / ".metadata").is_file() and len(list((state / "dcp").glob("*.distcp"))) == 2
    assert torch.load(state / "state.pt", weights_only=False)["world_size"] == 2

    student, _ = checkpoint.load(tmp_path / "student")
    resumed = run_distill(student, teacher, mix, config(steps=4, grad_accum=2), tmp_path / "run", progress=False)
    student, _ = checkpoint.load(tmp_path / "student")
    straight = run_distill(student, teacher, mix, config(steps=4, grad_accum=2), tmp_path / "one", progress=False)
    for key in ("loss", "kl", "nll", "lr", "tokens"):
        assert [r[key] for r in resumed.report["loss_curve"]] == pytest.approx(
            [r[key] for r in straight.report["loss_curve"]], rel=1e-5, abs=1e-7), key
    a, b = weights(tmp_path / "run"), weights(tmp_path / "one")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


LOAD = """
import json, sys, torch
from vac.core.rss import peak_rss_bytes
from vac.recover.distill import DistillConfig, init_distributed, shard_model
from vac.recover.sharded import load_sharded
env = init_distributed("cpu")
torch.set_num_threads(1)  # the same thread pools on every machine
# what either path imports, imported before the measurement: only tensors count in what grows
import accelerate, transformers.models.llama.modeling_llama
from vac import checkpoint
# one small model through the same path first: its first use of FSDP2, DTensor and safetensors (caches,
# thread pools, allocator arenas: a machine-dependent 10-30 MiB) is not what the bound is about
small = load_sharded(sys.argv[4], lambda m: shard_model(m, DistillConfig(fsdp=True)), env.device)
del small
before = peak_rss_bytes()
if sys.argv[2] == "sharded":
    model = load_sharded(sys.argv[1], lambda m: shard_model(m, DistillConfig(fsdp=True)), env.device)
    local = sum(p.to_local().numel() for p in model.parameters()) * 4
else:  # the path without meta construction: the whole model loaded on every rank, then sharded
    model, _ = checkpoint.load(sys.argv[1])
    model = shard_model(model, DistillConfig(fsdp=True))
    local = sum(p.to_local().numel() for p in model.parameters()) * 4
grown = peak_rss_bytes() - before
with open(f"{sys.argv[3]}/rank{env.rank}.json", "w") as f:  # one file per rank: stdout lines interleave
    json.dump({"rank": env.rank, "grown": grown, "local": local}, f)
"""


@pytest.mark.slow  # two launches of two processes with a 0.5 GB model
def test_meta_construction_never_holds_the_whole_model_per_rank(tmp_path):
    """Each rank's peak grows by its half of the weights (plus the pages of one shard being read), not by
    the whole model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config)
    dense.save_pretrained(tmp_path / "wide")
    whole = sum(p.numel() for p in dense.parameters()) * 4
    largest = max(p.numel() for p in dense.parameters()) * 4
    del dense
    small = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    LlamaForCausalLM(small).save_pretrained(tmp_path / "small")
    (tmp_path / "load.py").write_text(LOAD)
    grown = {}
    for how in ("sharded", "whole"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(tmp_path / "load.py"), str(tmp_path / "wide"), how,
               str(tmp_path / how), str(tmp_path / "small")]
        (tmp_path / how).mkdir()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(f.read_text()) for f in sorted((tmp_path / how).glob("rank*.json"))]
        assert len(rows) == 2
        grown[how] = rows
    for row in grown["sharded"]:
        assert row["local"] == pytest.approx(whole / 2, rel=0.01)  # each rank holds half of the weights
        # its half, plus the mapped file pages of the shard being read (at most half of the largest tensor)
        # and 16 MiB for the module objects and FSDP2's state;
        # reading each full tensor (DCP's full_state_dict load) added about 3.7 largest tensors instead
        assert row["grown"] - row["local"] < largest / 2 + 16 * 2**20, (row, largest)
    for row in grown["whole"]:
        assert row["grown"] > 0.95 * whole, (row, whole)  # what loading the whole model on every rank costs


STEP_MEMORY = """
import json, sys, torch
from vac.core.rss import peak_rss_bytes
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from conftest import tokens
from transformers import LlamaConfig, LlamaForCausalLM
from vac.recover.distill import DistillConfig, run_distill
from vac.recover.data import DataMix, Samples
config = LlamaConfig(vocab_size=128, hidden_size=768, intermediate_size=2048, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=8)
torch.manual_seed(0)
student, teacher = LlamaForCausalLM(config), LlamaForCausalLM(config)
cfg = DistillConfig(steps=2, seq_len=256, batch_size=4, save_every=100, grad_checkpoint=sys.argv[2] == "1")
before = int(open("/proc/self/statm").read().split()[1]) * 4096
run_distill(student, teacher, DataMix(Samples.windows(tokens(8, 256))), cfg, sys.argv[1], progress=False)
print(peak_rss_bytes() - before)
"""


@pytest.mark.slow  # two two-step distillations of a 0.11 GB model in subprocesses (the second step holds
# the AdamW moments, the gradients and the activations at once)
def test_memory_plan_matches_the_measured_step(tmp_path):
    """What a training step adds to the loaded models (gradients, AdamW moments, activations, logits)
    as vac.recover.memory plans it, against the measured peak RSS; and the saving of --grad-checkpoint."""
    from transformers import LlamaConfig

    from vac.recover.memory import Net, distill_bytes

    config = LlamaConfig(vocab_size=128, hidden_size=768, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8)
    net = Net.of(config)
    (tmp_path / "step.py").write_text(STEP_MEMORY.format(tests=str(Path(__file__).parent)))
    measured, planned = {}, {}
    for ck in (False, True):
        # a fixed mmap threshold: every freed tensor goes back to the system at once, so the peak RSS is
        # the peak of the live tensors, not of glibc's heap as it happened to fragment
        run = subprocess.run([sys.executable, str(tmp_path / "step.py"), str(tmp_path / f"out{ck}"), str(int(ck))],
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        assert run.returncode == 0, run.stderr[-2000:]
        measured[ck] = int(run.stdout.split()[-1])
        plan = distill_bytes(net, net, world=1, fsdp=False, bf16=False, grad_checkpoint=ck, micro_batch=4,
                             seq_len=256, loss_chunk=128, top_k=64, cached_teacher=False)
        planned[ck] = plan["peak"] - plan["weights"] - plan["teacher"]  # what the step adds to the loaded models
        assert 0.9 < measured[ck] / planned[ck] < 1.15, (ck, measured[ck], planned[ck])
    saving = planned[False] - planned[True]
    assert measured[False] - measured[True] == pytest.approx(saving, rel=0.15)


# ----------------------------------------------------------------------------- CLI


def test_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    import vac.cli.distill  # noqa: F401  (registers the command)
    from vac.cli import app

    runner = CliRunner()
    cases = [
        (["distill", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "no checkpoint folder"),
        (["distill", str(tmp_path), "--out", str(tmp_path / "o"), "--alpha", "2"], "--alpha"),
        (["distill", str(tmp_path), "--out", str(tmp_path / "o"), "--batch-size", "0"], "--batch-size"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())  # rich wraps at the terminal width
        assert text.startswith("error:") and message in text and "Traceback" not in text, result.output


def test_memory_plan_counts_the_real_parameters():
    from vac.recover.memory import Net, distill_bytes

    student = student_of()
    net = Net.of(student.config)  # a vac config: its rank map builds the factors
    assert net.params == sum(p.numel() for p in student.parameters())
    linears = [m for n, m in student.named_modules() if n.startswith("model.layers.")
               and n.endswith("_proj")]
    assert len(linears) == 2 * 7 and net.linear_params == sum(p.numel() for m in linears for p in m.parameters())
    one = distill_bytes(net, net, world=1, fsdp=True, bf16=False, grad_checkpoint=False, micro_batch=2, seq_len=16,
                        loss_chunk=128, top_k=8, cached_teacher=True)
    four = distill_bytes(net, net, world=4, fsdp=True, bf16=False, grad_checkpoint=False, micro_batch=2, seq_len=16,
                         loss_chunk=128, top_k=8, cached_teacher=True)
    assert one["weights"] == net.params * 4 and four["weights"] == net.params  # sharded over 4 ranks
    assert one["adam"] == 2 * net.linear_params * 4 and one["teacher"] == 0


def test_cli_dry_run_prints_the_plan_per_rank_and_loads_nothing(tiny_folder, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import vac.cli.distill  # noqa: F401  (registers the command)
    from vac import checkpoint as ckpt_module
    from vac.cli import app
    from vac.recover.memory import Net, distill_bytes

    student = student_of()
    checkpoint.save(student, tiny_tokenizer(), tmp_path / "ckpt")
    monkeypatch.setattr(ckpt_module, "load", lambda *a, **k: pytest.fail("--dry-run loaded a model"))
    run = CliRunner().invoke(app, ["distill", str(tmp_path / "ckpt"), "--teacher", str(tiny_folder), "--data",
                                   str(tmp_path / "calib.txt"), "--dry-run", "--fsdp", "--bf16", "--seq-len", "32",
                                   "--batch-size", "8"], env={"COLUMNS": "250"})
    assert run.exit_code == 0, run.output
    rows = [line.split("│") for line in run.output.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 4, 8] and [int(r[1]) for r in rows] == [8, 4, 2, 1]
    expected = distill_bytes(Net.of(student.config), Net.of(tiny_llama(layers=2).config), world=4, fsdp=True, bf16=True,
                             grad_checkpoint=False, micro_batch=2, seq_len=32, loss_chunk=128, top_k=64,
                             cached_teacher=False)
    from vac.core.memory import human

    assert rows[2][-1].strip() == human(expected["peak"])
    assert not (tmp_path / "out").exists()


def test_cli_cache_teacher_only_then_train_from_the_cache(tiny_folder, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import vac.cli.distill  # noqa: F401  (registers the command)
    import vac.models.zoo
    from vac import checkpoint
    from vac.cli import app
    from vac.models.layers import factorize_

    model, tok = checkpoint.load(tiny_folder)
    checkpoint.save(factorize_(model, {"model.layers.0.mlp.down_proj": 8, "model.layers.1.self_attn.q_proj": 8}),
                    tok, tmp_path / "ckpt")
    common = ["distill", str(tmp_path / "ckpt"), "--teacher", str(tiny_folder), "--data", str(tmp_path / "calib.txt"),
              "--teacher-cache", str(tmp_path / "tc"), "--steps", "2", "--seq-len", "16", "--batch-size", "2",
              "--chat-fraction", "0", "--eval", "", "--top-k", "16", "--device", "cpu"]
    runner = CliRunner()
    assert " ".join(runner.invoke(app, common[:2] + ["--cache-teacher-only"]).output.split()).startswith(
        "error: --cache-teacher-only needs --teacher-cache")
    filled = runner.invoke(app, common + ["--cache-teacher-only"])
    assert filled.exit_code == 0, filled.output
    assert "4 written" in " ".join(filled.output.split()) and not (tmp_path / "out").exists()

    def no_teacher(*_a, **_k):
        raise AssertionError("the teacher was loaded")
    monkeypatch.setattr(vac.models.zoo, "load_model", no_teacher)
    trained = runner.invoke(app, common + ["--out", str(tmp_path / "out")])
    assert trained.exit_code == 0, trained.output
    report = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert report["teacher_cache"]["hits"] == 4 and report["teacher_cache"]["misses"] == 0
