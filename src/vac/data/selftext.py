"""Calibration text the dense model writes itself: its sampled answers to the ``calib`` chat prompts.

Such text follows the model's own distribution and its chat format, which no corpus does (the issue
that motivated it: calibrated on literary text only, the compressed instruct model stopped answering
on topic). Conversations are rendered with the model's chat template (prompt + sampled answer) and
written as a ``.jsonl`` of ``{"text": ...}`` records, so that any data spec can mix them in:
``--calib handbook:calib+PATH``. Sampling is batched and seeded; the file is cached per model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import VacError
from .prompts import prompts as prompt_set


@torch.no_grad()
def self_text(model, tokenizer, prompts: tuple[str, ...], samples: int = 8, max_new_tokens: int = 128,
              temperature: float = 0.8, top_p: float = 0.95, seed: int = 0) -> list[str]:
    """``samples`` conversations per prompt: chat template of the prompt and the model's sampled answer."""
    from ..deploy.chat import render_prompt, stop_token_ids

    if not getattr(tokenizer, "chat_template", None):
        raise VacError("self-generated calibration text needs a chat template (an instruct/chat model)")
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    rendered = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered]
    width = max(map(len, ids))  # left-padded by hand: a tokenizer need not have a pad token
    batch = {"input_ids": torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device),
             "attention_mask": torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)}
    stops = stop_token_ids(model, tokenizer)
    texts = []
    for k in range(samples):
        torch.manual_seed(seed + k)
        out = model.generate(**batch, do_sample=True, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, eos_token_id=stops or None, pad_token_id=pad)
        for prompt, row in zip(rendered, out[:, batch["input_ids"].shape[1]:].tolist()):
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))  # the answer, and its end mark
            texts.append(prompt + tokenizer.decode(row[:cut], skip_special_tokens=True)
                         + tokenizer.decode(row[cut:cut + 1]))
    return texts


def cached_self_text(model, tokenizer, source: str | None, samples: int = 8, max_new_tokens: int = 128,
                     seed: int = 0) -> Path:
    """The ``.jsonl`` of :func:`self_text` on the ``calib`` prompts, cached under ``$VAC_HOME/self``
    for an unchanged model folder ``source``."""
    import json

    from ..atomic import atomic_write
    from ..cache import cache_dir, cache_key

    prompts = prompt_set("calib")
    key = cache_key(source, "selftext/1", list(prompts), samples, max_new_tokens, seed)
    if key is None:
        raise VacError("self-generated calibration text is cached per model folder; pass a local model")
    path = cache_dir() / "self" / f"{key}.jsonl"
    if not path.is_file():
        texts = self_text(model, tokenizer, prompts, samples, max_new_tokens, seed=seed)
        atomic_write(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path
