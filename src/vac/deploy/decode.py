"""Inference layout of a loaded vac model for batch-1 decoding on CPUs (same outputs, fewer cycles).

At batch 1 every linear is a matrix-vector product, bound by reading its weights, plus a fixed cost
per call (dispatch, thread start-up). A factorized layer makes two calls where the dense one made
one, on thin matrices that stream below the memory bandwidth of large ones. :func:`fast_decode_`
removes what it can of that overhead without touching the checkpoint format.
"""

from __future__ import annotations

import torch

from .compat import bind_direct_forward, has_hooks


def fast_decode_(model) -> int:
    """Prepare the LowRankLinear layers of a loaded model for fast decoding, in place; same outputs.

    * ``up`` weights ([out, rank]) are re-laid out column-major (``w.t().contiguous().t()``: same
      shape and values, ``stride == (1, out)``). A batch-1 decode step multiplies a vector by each
      weight; with the stock row-major layout the ``up`` product is a dot product over rows only
      ``rank`` long, which MKL streams at about half the memory bandwidth of the transposed
      (axpy-like) form. Prefill GEMMs are indifferent to the layout. Costs a copy of the ``up``
      factors (the mmap-backed originals then stay mapped; those pages are clean and reclaimable).
    * ``forward`` calls ``F.linear`` twice directly instead of the two ``nn.Linear`` submodules.

    Stacking the ``down`` factors of siblings that read the same input (q/k/v, gate/up) into one
    product was measured too (``benchmarks/decode_probe.py``) and gained nothing on this CPU, so it
    is not done. Layers with hooks keep the stock forward; int8 (torchao) weights keep their layout.
    ``save_pretrained`` still writes the standard format. Returns the number of layers changed.
    """
    from ..checkpoint.hf.modeling_vac import LowRankLinear

    changed = 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LowRankLinear):
                continue
            up = module.up.weight
            if type(up.data) is torch.Tensor and up.dim() == 2 and up.stride(0) != 1:
                up.data = up.data.t().contiguous().t()
            if not has_hooks(module, module.down, module.up):
                bind_direct_forward(module)
            changed += 1
    return changed
