"""Perplexity under a fixed protocol.

Protocol: the held-out text is tokenized once and cut into non-overlapping windows of ``seq_len``
tokens (:func:`vac.data.windows.eval_windows`); every shifted token of every window is scored with
``use_cache=False``; PPL = exp(mean NLL over all scored tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> dict:
    """{'ppl', 'nll', 'tokens', 'seq_len', 'windows'} of ``model`` on ``windows`` [n, seq_len]."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    nll = total / count
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "tokens": count,
        "seq_len": windows.shape[1],
        "windows": windows.shape[0],
    }


def measured_ppl(model, tokenizer, source: str, data: str, seq_len: int, windows: int | None,
                 cache: bool = False, progress: bool = True, score=None) -> dict:
    """:func:`perplexity` on the first ``windows`` windows of ``data`` (the protocol above), plus
    ``data``; with ``cache``, results for unchanged model folders are kept under ``$VAC_HOME/ppl``.
    ``score(windows)`` replaces ``perplexity(model, windows)`` (e.g. the layer-streamed one, which
    computes in fp32 like the loaded model)."""
    from ..cache import cache_dir, cache_key, cached_json
    from ..data.windows import eval_windows

    dtype = str(model.dtype) if model is not None else str(torch.float32)
    key = cache_key(source, data, seq_len, windows, dtype) if cache else None
    path = cache_dir() / "ppl" / f"{key}.json" if key else None
    score = score or (lambda w: perplexity(model, w, progress=progress))
    return cached_json(path, lambda: score(eval_windows(tokenizer, data, seq_len, windows)) | {"data": data})
