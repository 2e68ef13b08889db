"""Inference layout of a loaded vac model for batch-1 decoding on CPUs (same outputs, fewer cycles).

At batch 1 every linear is a matrix-vector product, bound by reading its weights, plus a fixed cost
per call (dispatch, thread start-up). A factorized layer makes two calls where the dense one made
one, on thin matrices that stream below the memory bandwidth of large ones. :func:`fast_decode_`
removes what it can of that overhead without touching the checkpoint format.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# modules called on the same input tensor one after the other by every supported decoder
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _low_rank_forward(self, x):
    return F.linear(F.linear(x, self.down.weight), self.up.weight, self.up.bias)


def _version(x: torch.Tensor):
    return None if x.is_inference() else x._version  # inference tensors keep no version counter


class SharedDown:
    """The ``down`` factors of sibling layers that read the same input, as one stacked matrix.

    The first sibling called on an input computes all their rank-space activations in one product;
    the others take their slice of it while the input is the same tensor (same object, same version).
    """

    def __init__(self, weights: list[torch.Tensor]):
        self.weight = torch.cat(weights).contiguous()
        edges = [0]
        for w in weights:
            edges.append(edges[-1] + w.shape[0])
        self.slices = [slice(a, b) for a, b in zip(edges, edges[1:])]
        self._key = self._z = None

    def __call__(self, x: torch.Tensor, index: int) -> torch.Tensor:
        key = (x, _version(x))
        if self._key is None or self._key[0] is not x or self._key[1] != key[1]:
            self._z = F.linear(x, self.weight)
            self._key = key
        return self._z[..., self.slices[index]]

    def forward_of(self, index: int):
        shared = self

        def forward(self, x):
            return F.linear(shared(x, index), self.up.weight, self.up.bias)

        return forward


def _hooked(module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in (module, module.down, module.up))


def fast_decode_(model, fuse: bool = True) -> int:
    """Prepare the LowRankLinear layers of a loaded model for fast decoding, in place; same outputs.

    * ``up`` weights ([out, rank]) are re-laid out column-major (``w.t().contiguous().t()``: same
      shape and values, ``stride == (1, out)``). A batch-1 decode step multiplies a vector by each
      weight; with the stock row-major layout the ``up`` product is a dot product over rows only
      ``rank`` long, which MKL streams at about half the memory bandwidth of the transposed
      (axpy-like) form. Prefill GEMMs are indifferent to the layout.
    * ``forward`` calls ``F.linear`` twice directly instead of the two ``nn.Linear`` submodules.
    * ``fuse``: siblings that read the same input (q/k/v, gate/up; :data:`SIBLINGS`) share one
      ``down`` product over their stacked factors (:class:`SharedDown`): one call instead of three
      (two), on a matrix as wide as their ranks together.

    Layers with hooks on them keep the stock forward; int8 (torchao) weights keep their layout and
    are not stacked. Meant for inference: a model whose siblings are stacked still holds its own
    ``down`` weights (unused) and saves as before. Returns the number of layers changed.
    """
    from .checkpoint.hf.modeling_vac import LowRankLinear

    plain = lambda t: type(t.data) is torch.Tensor  # noqa: E731  (not a torchao subclass)
    changed = 0
    with torch.no_grad():
        for parent in model.modules():
            children = dict(parent.named_children())
            fused: set[str] = set()
            for group in SIBLINGS if fuse else ():
                members = [children.get(name) for name in group]
                members = [m for m in members if isinstance(m, LowRankLinear)]
                if len(members) < 2 or any(_hooked(m) or not plain(m.down.weight) for m in members):
                    continue
                if len({(m.in_features, m.down.weight.dtype) for m in members}) != 1:
                    continue
                shared = SharedDown([m.down.weight for m in members])
                for index, m in enumerate(members):
                    m.forward = types.MethodType(shared.forward_of(index), m)
                    m._vac_shared_down = shared  # keeps it alive with the layer
                fused |= {name for name, m in children.items() if any(m is x for x in members)}
            for name, module in children.items():
                if not isinstance(module, LowRankLinear):
                    continue
                up = module.up.weight
                if plain(up) and up.dim() == 2 and up.stride(0) != 1:
                    up.data = up.data.t().contiguous().t()
                if name not in fused and not _hooked(module):
                    module.forward = types.MethodType(_low_rank_forward, module)
                changed += 1
    return changed
