"""Tokenized windows from text sources: the evaluation protocol and calibration sampling.

Documents are tokenized one by one (no special tokens) and joined with the tokenizer's EOS token
into one stream. Evaluation takes the first ``n`` non-overlapping windows of ``seq_len`` tokens in
order; calibration takes ``n`` distinct non-overlapping windows at random positions (seeded), an equal
share from each part of a mix ``a+b``.
"""

from __future__ import annotations

import hashlib
import json

import torch

from ..atomic import torch_save
from ..cache import cache_dir, load_entry
from ..errors import VacError
from .specs import parse_spec, read_source


def token_stream(tokenizer, spec: str) -> torch.Tensor:
    """All documents of ``spec`` as one 1-D LongTensor of token ids (cached on disk by content)."""
    docs = read_source(spec)
    key = hashlib.sha256(
        json.dumps([tokenizer.name_or_path, len(tokenizer), [t for _, t in docs]]).encode()
    ).hexdigest()[:24]
    path = cache_dir() / "tokens" / f"{key}.pt"
    hit = load_entry(path, lambda p: torch.load(p, weights_only=True))
    if isinstance(hit, torch.Tensor) and hit.dtype == torch.long and hit.dim() == 1:
        return hit
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for _, text in docs:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
    stream = torch.tensor(ids, dtype=torch.long)
    torch_save(stream, path)
    return stream


def _slots(stream: torch.Tensor, seq_len: int) -> int:
    if seq_len < 2:
        raise VacError(f"--seq-len must be at least 2, got {seq_len}")
    return stream.numel() // seq_len


def eval_windows(tokenizer, spec: str, seq_len: int, n: int | None = None) -> torch.Tensor:
    """The first ``n`` (all if None) non-overlapping windows of ``spec``: LongTensor [n, seq_len]."""
    stream = token_stream(tokenizer, spec)
    slots = _slots(stream, seq_len)
    n = slots if n is None else n
    if n < 1 or slots < n:
        raise VacError(
            f"too little text in '{spec}': {stream.numel()} tokens give {slots} windows of {seq_len}, "
            f"{n} needed"
        )
    return stream[: n * seq_len].view(n, seq_len)


def sample_windows(tokenizer, spec: str, seq_len: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` distinct non-overlapping windows at random slots of ``spec`` (deterministic per seed).

    A mix ``a+b+…`` takes an equal share of the windows from each part (the first ``n mod k`` parts
    one more), so a small corpus is not drowned by a large one, then shuffles them (the first windows,
    which the Fisher pass uses, come from every part)."""
    parts = [part.text for part in parse_spec(spec)]
    if len(parts) == 1:
        return _sample(tokenizer, spec, seq_len, n, seed)
    if n < len(parts):
        raise VacError(f"{n} calibration windows cannot take a share of each of the {len(parts)} parts of '{spec}'")
    counts = [n // len(parts) + (i < n % len(parts)) for i in range(len(parts))]
    windows = torch.cat([_sample(tokenizer, part, seq_len, c, seed + i) for i, (part, c) in enumerate(zip(parts, counts))])
    return windows[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def _sample(tokenizer, spec: str, seq_len: int, n: int, seed: int) -> torch.Tensor:
    stream = token_stream(tokenizer, spec)
    slots = _slots(stream, seq_len)
    if n < 1 or slots < n:
        raise VacError(
            f"too little calibration data in '{spec}': {stream.numel()} tokens give {slots} windows "
            f"of {seq_len}, {n} needed"
        )
    pick = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))[:n]
    return stream[: slots * seq_len].view(slots, seq_len)[pick]
