"""Refinement of a factorized decoder layer against the dense one (block reconstruction).

After the linears of layer ``i`` are factorized, its low-rank factors (attention and MLP together) are
fitted by a few Adam steps to reproduce a target output of the dense layer from the inputs the
compressed layer receives (those that passed the compressed layers below it):

- ``own``: the dense layer applied to the same (compressed) inputs: the layer learns to do what the
  dense layer would do with what it gets;
- ``dense``: the dense model's own hidden states after layer ``i`` (the dense layer on the dense
  inputs): the layer also absorbs the error of the layers below it.

The loss is the squared error summed over the calibration batches, relative to the target's energy.
The calibration error is measured before and after; a refinement that does not lower it is undone,
so refining never raises the layer's error on its calibration inputs. Only the factors train (norms
and any dense linears stay as they are).

Libraries considered: llm-compressor's and GPTQModel's sequential pipelines solve a per-linear least
squares with their own solvers (GPTQ), not a block fit of low-rank factors; torch.optim's Adam does the
optimization here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpoint.hf.modeling_vac import LowRankLinear
from . import distributed as dist


@dataclass
class Refined:
    """The relative calibration error of one layer before and after its refinement."""

    before: float
    after: float
    kept: bool  # False: the fit did not lower the error and was undone
    # the refined layer's outputs on the inputs (what ``keep`` made of them), when it was kept: the
    # next layer's inputs, without another pass
    outputs: object = None


def factor_parameters(layer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for m in layer.modules() if isinstance(m, LowRankLinear) for p in (m.up.weight, m.down.weight)]


@torch.no_grad()
def layer_error(stream, i: int, inputs, targets, batches, keep=None):
    """Σ‖layer(x) − y‖² / Σ‖y‖² over the batches (of every rank); with ``keep`` (e.g. ``list``), also
    what ``keep`` makes of the outputs, as ``(error, kept)``."""
    sums = torch.zeros(2, dtype=torch.float64, device=batches[0].device)

    def outputs():
        for x, y, b in zip(inputs, targets, batches):
            out = stream.layer(i, x, b)
            sums[0] += (out - y).double().square().sum()
            sums[1] += y.double().square().sum()
            yield out

    kept = (keep or _drain)(outputs())
    dist.all_reduce_(sums)
    error = (sums[0] / sums[1].clamp_min(1e-30)).item()
    return (error, kept) if keep else error


def _drain(items) -> None:
    for _ in items:
        pass


def refine_layer(stream, i: int, inputs, targets, batches, steps: int, lr: float, keep=None) -> Refined:
    """Fit the factors of layer ``i`` of ``stream`` so that it maps ``inputs`` (hidden states per batch)
    to ``targets``; ``steps`` Adam steps, one batch each, cycling over the batches. ``keep`` (e.g.
    ``list``): return the refined layer's outputs too (``Refined.outputs``, None if it was undone)."""
    layer = stream.layers[i]
    params = factor_parameters(layer)
    before = layer_error(stream, i, inputs, targets, batches)
    if not params or steps <= 0:
        return Refined(before, before, False)
    saved = [p.detach().clone() for p in params]
    flags = {p: p.requires_grad for p in layer.parameters()}
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    energy = [y.double().square().sum().item() / y.numel() for y in targets]
    opt = torch.optim.Adam(params, lr=lr)
    ranks = dist.world()[1]
    try:
        for step in range(steps):
            j = step % len(batches)
            with torch.enable_grad():
                out = stream.layer(i, inputs[j], batches[j])
                loss = (out - targets[j]).square().mean() / max(energy[j], 1e-30)
                loss.backward()
            if ranks > 1:  # several processes (torchrun): each step averages the ranks' gradients
                dist.all_reduce_(*(p.grad for p in params))
                for p in params:
                    p.grad /= ranks
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    del opt
    after, outputs = layer_error(stream, i, inputs, targets, batches, keep) if keep else (
        layer_error(stream, i, inputs, targets, batches), None)
    if not after < before:
        del outputs
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        return Refined(before, before, False)
    return Refined(before, after, True, outputs)
