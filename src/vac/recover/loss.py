"""The distillation loss: KL to the teacher and NLL of the next token, per scored token.

:func:`kd_sums` is the reference on whole logits. Training uses :func:`head_kd_loss`, which takes the
final hidden states instead of logits and applies the LM head itself, a chunk of scored tokens at a
time, with the gradients of each chunk written in the forward pass (the way fused linear-cross-entropy
kernels work): the [tokens, vocabulary] logits never exist whole, for the student nor the teacher, and
nothing of a chunk is kept for the backward pass but the gradients with respect to the hidden states
and the head's weight. At 7B (vocabulary 100k, 2048 positions) whole fp32 logits are 0.8 GB per
sequence, before their gradient and the softmax copies; on a CPU, blocks that large are mapped and
unmapped by the allocator at every step. (Liger-Kernel's fused linear cross-entropy and JSD were
considered: they have no KL on a cached top-k support, no CPU path and no factorized head.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.hf.modeling_vac import LowRankLinear
from ..errors import VacError


def kd_sums(student_logits, targets, mask, temperature, teacher_logits=None, teacher_topk=None):
    """Sums over the scored positions: ``(kl_sum, nll_sum, n)``.

    All tensors are aligned on prediction positions: ``student_logits`` [b, P, V] predicts
    ``targets`` [b, P]; ``mask`` [b, P] marks scored positions. The teacher is either full logits
    [b, P, V] (full-vocabulary KL) or ``(values, indices)`` [b, P, k] (KL on the renormalized top-k
    support, see :mod:`vac.recover.distill`).
    """
    mask = mask.bool()
    s = student_logits[mask].float()
    nll = F.cross_entropy(s, targets[mask], reduction="sum")
    if teacher_logits is not None:
        t = teacher_logits[mask].float()
    elif teacher_topk is not None:
        values, indices = teacher_topk
        t = values[mask].float()
        s = s.gather(-1, indices[mask].long())
    else:
        raise ValueError("kd_sums needs teacher_logits or teacher_topk")
    log_p = F.log_softmax(t / temperature, dim=-1)
    log_q = F.log_softmax(s / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    return kl, nll, int(mask.sum())


def combine(kl_sum, nll_sum, n_tokens, temperature, alpha):
    """``α·T²·kl_sum/N + (1−α)·nll_sum/N``: the per-token loss of a batch with N scored positions."""
    return (alpha * temperature**2 * kl_sum + (1.0 - alpha) * nll_sum) / max(n_tokens, 1)


def kd_loss(student_logits, targets, mask, temperature=1.0, alpha=0.5, teacher_logits=None,
            teacher_topk=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean KL, mean NLL) of one batch, both terms averaged per scored token."""
    kl, nll, n = kd_sums(student_logits, targets, mask, temperature, teacher_logits, teacher_topk)
    return combine(kl, nll, n, temperature, alpha), kl / max(n, 1), nll / max(n, 1)


def split_head(head: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, nn.Linear]:
    """``(x, linear)`` with ``head(hidden) == linear(x)``: a factorized head's ``down`` is applied here
    (through autograd), its ``up`` is the linear the fused loss applies per chunk."""
    if isinstance(head, LowRankLinear):
        return head.down(hidden), head.up
    if isinstance(head, nn.Linear):
        return hidden, head
    raise VacError(f"the LM head is a {type(head).__name__}; distillation needs an nn.Linear or a LowRankLinear")


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter sharded by FSDP2 (a DTensor) gathered whole; anything else as it is."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def _capped(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    return z if not cap else torch.tanh(z / cap).mul_(cap)


class _HeadKD(torch.autograd.Function):
    """``kl_weight·KL_sum + nll_weight·NLL_sum`` of the logits ``x @ weightᵀ + bias`` over chunks of
    rows; each chunk's gradient is taken in the forward pass (closed form below), so the backward pass
    only scales what was accumulated.

    With student logits s and q = softmax(s/T) over the KL's support (the vocabulary, or the teacher's
    top-k ids), p the teacher's softmax(t/T) there: ∂KL/∂s = (q − p)/T on the support; ∂NLL/∂s =
    softmax(s) − onehot(target). With a final soft cap c (Gemma 2/3: s = c·tanh(z/c) of the head's
    output z) the gradient is multiplied by ∂s/∂z = 1 − (s/c)²."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, teacher_x, teacher_weight, teacher_bias, topk_values, topk_indices,
                temperature, kl_weight, nll_weight, chunk, dtype, softcap, teacher_softcap):
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        grad_x = torch.empty_like(x) if want_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        tw = None if teacher_weight is None else teacher_weight.to(dtype)
        tb = None if teacher_bias is None else teacher_bias.to(dtype)
        kl_sum = torch.zeros((), dtype=torch.float64, device=x.device)
        nll_sum = torch.zeros((), dtype=torch.float64, device=x.device)
        for a in range(0, x.shape[0], chunk):
            rows = slice(a, a + chunk)
            xc = x[rows].to(dtype)
            s = _capped(F.linear(xc, w, b).float(), softcap)
            y = targets[rows]
            log_soft = F.log_softmax(s, dim=-1)
            nll_sum += -log_soft.gather(-1, y[:, None]).sum().double()
            if teacher_x is not None:
                t = _capped(F.linear(teacher_x[rows].to(dtype), tw, tb).float(), teacher_softcap)
                support = None
                s_kl = s
            else:
                t = topk_values[rows].float()
                support = topk_indices[rows]
                s_kl = s.gather(-1, support)
            log_p = F.log_softmax(t / temperature, dim=-1)
            log_q = F.log_softmax(s_kl / temperature, dim=-1)
            p = log_p.exp()
            kl_sum += (p * (log_p - log_q)).sum().double()
            if not (want_x or want_w or want_b):
                continue
            d = log_soft.exp_().mul_(nll_weight)  # nll_weight · softmax(s): log_soft is not needed any more
            d[torch.arange(d.shape[0], device=d.device), y] -= nll_weight
            d_kl = (log_q.exp() - p).mul_(kl_weight / temperature)
            if support is None:
                d += d_kl
            else:
                d.scatter_add_(-1, support, d_kl)
            if softcap:
                d.mul_(1.0 - (s / softcap).square())
            d = d.to(dtype)
            if want_x:
                grad_x[rows] = (d @ w).to(x.dtype)
            if want_w:
                grad_w.addmm_(d.t().float(), xc.float())
            if want_b:
                grad_b += d.float().sum(0)
        ctx.save_for_backward(grad_x, None if grad_w is None else grad_w.to(weight.dtype),
                              None if grad_b is None else grad_b.to(bias.dtype))
        loss = (kl_weight * kl_sum + nll_weight * nll_sum).float()
        ctx.mark_non_differentiable(kl_sum, nll_sum)
        return loss, kl_sum, nll_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_nll):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)  # noqa: E731
        return scale(grad_x), scale(grad_w), scale(grad_b), *([None] * 13)


def head_kd_loss(hidden, head, targets, mask, temperature, kl_weight, nll_weight, *, teacher_hidden=None,
                 teacher_head=None, teacher_topk=None, chunk: int = 128, softcap: float | None = None,
                 teacher_softcap: float | None = None):
    """``(loss, kl_sum, nll_sum, n)`` of one micro-batch from final hidden states: ``loss =
    kl_weight·KL_sum + nll_weight·NLL_sum`` over the scored positions, the same sums as :func:`kd_sums`
    on ``head(hidden)`` (up to rounding), with the head applied ``chunk`` scored tokens at a time.

    ``hidden`` [b, P, H] predicts ``targets`` [b, P] where ``mask`` [b, P]; the teacher is either its
    final hidden states ``teacher_hidden`` [b, P, H'] with its ``teacher_head``, or ``teacher_topk``
    ``(values, indices)`` [b, P, k]. Only ``loss`` carries gradients (to ``hidden`` and the head's
    parameters). ``softcap``/``teacher_softcap``: the model's ``final_logit_softcapping`` (applied to
    the head's output, as Gemma 2/3 do). The logits are computed in the autocast dtype when autocast is
    on (as the head itself would be), else in the head's dtype; the softmaxes and sums in fp32.
    """
    if chunk <= 0:
        raise VacError(f"--loss-chunk must be positive, got {chunk}")
    mask = mask.bool()
    n = int(mask.sum())
    x, linear = split_head(head, hidden[mask])
    weight, bias = _full(linear.weight), _full(linear.bias)
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    teacher_x = teacher_weight = teacher_bias = values = indices = None
    if teacher_hidden is not None:
        with torch.no_grad():
            teacher_x, teacher_linear = split_head(teacher_head, teacher_hidden[mask])
        teacher_weight, teacher_bias = _full(teacher_linear.weight), _full(teacher_linear.bias)
    elif teacher_topk is not None:
        values, indices = teacher_topk[0][mask], teacher_topk[1][mask].long()
    else:
        raise ValueError("head_kd_loss needs teacher_hidden or teacher_topk")
    with torch.autocast(device_type, enabled=False):
        loss, kl_sum, nll_sum = _HeadKD.apply(x, weight, bias, targets[mask], teacher_x, teacher_weight, teacher_bias,
                                              values, indices, float(temperature), float(kl_weight),
                                              float(nll_weight), int(chunk), dtype, softcap, teacher_softcap)
    return loss, kl_sum, nll_sum, n


@torch.no_grad()
def top_logits(hidden, head, k: int, chunk: int = 128, softcap: float | None = None):
    """``(values, indices)`` [b, P, k]: the ``k`` largest logits of ``head(hidden)`` (soft-capped
    when the model caps them) and their ids, the head applied ``chunk`` positions at a time, so a
    teacher cache pass never holds [b, P, vocabulary] logits either."""
    values, indices = [], []
    for a in range(0, hidden.shape[1], chunk):
        top = _capped(head(hidden[:, a:a + chunk]).float(), softcap).topk(k, dim=-1)
        values.append(top.values)
        indices.append(top.indices)
    return torch.cat(values, 1), torch.cat(indices, 1)
