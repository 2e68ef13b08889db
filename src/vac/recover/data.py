"""Training data of ``vac distill``: text windows interleaved with chat-formatted samples.

``DataMix`` puts the sample at global position ``p`` as a pure function of ``(seed, p)``, so the data
order does not depend on the number of processes and a resumed run continues where it stopped (see
:mod:`vac.recover.distill`). Chat samples come from a jsonl file of ``messages`` or are built from the text
corpora (question/answer pairs about passages, with a short ``<think>`` block), and are rendered with
the tokenizer's chat template.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DISTILL_CHAT_FRACTION, DISTILL_CHAT_SAMPLES
from ..errors import VacError


@dataclass
class Samples:
    """Token sequences of one length: ``ids`` [N, L] and ``mask`` [N, L] (True on real tokens)."""

    ids: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    @classmethod
    def windows(cls, ids: torch.Tensor) -> Samples:
        return cls(ids.long(), torch.ones_like(ids, dtype=torch.bool))


class DataMix:
    """Text windows interleaved with chat samples; the sample at position p depends on (seed, p) only.

    One epoch holds every text window once plus ``round(n_text·f/(1−f))`` chat samples (f the chat
    fraction), in an order permuted by ``(seed, epoch)``; chat samples are drawn cyclically from their
    pool, so a small chat pool repeats.
    """

    def __init__(self, text: Samples, chat: Samples | None = None, chat_fraction: float = 0.0, seed: int = 0):
        if not 0.0 <= chat_fraction < 1.0:
            raise VacError(f"--chat-fraction must be in [0, 1), got {chat_fraction}")
        if len(text) == 0:
            raise VacError("no text windows to train on")
        if chat is not None and chat.ids.shape[1] != text.ids.shape[1]:
            raise ValueError("text and chat samples must have the same length")
        self.text, self.chat, self.seed = text, chat, seed
        self.chat_fraction = chat_fraction if chat is not None and len(chat) else 0.0
        n = len(text)
        self.n_chat_epoch = round(n * self.chat_fraction / (1 - self.chat_fraction)) if self.chat_fraction else 0
        self.epoch_len = n + self.n_chat_epoch
        self._perm: tuple[int, torch.Tensor] | None = None

    @property
    def seq_len(self) -> int:
        return self.text.ids.shape[1]

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.epoch_len, generator=gen))
        return self._perm[1]

    def source(self, position: int) -> tuple[Samples, int]:
        epoch, j = divmod(position, self.epoch_len)
        k = int(self._order(epoch)[j])
        if k < len(self.text):
            return self.text, k
        return self.chat, (epoch * self.n_chat_epoch + k - len(self.text)) % len(self.chat)  # type: ignore[arg-type]

    def batch(self, position: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` [n, L] of the samples at positions ``position .. position+n-1``."""
        picked = [self.source(p) for p in range(position, position + n)]
        ids = torch.stack([s.ids[i] for s, i in picked])
        mask = torch.stack([s.mask[i] for s, i in picked])
        return ids, mask

    def describe(self) -> dict:
        return {"text_windows": len(self.text), "chat_samples": len(self.chat) if self.chat is not None else 0,
                "chat_fraction": self.chat_fraction, "seq_len": self.seq_len, "seed": self.seed}


def text_windows(tokenizer, spec: str, seq_len: int) -> Samples:
    """Every non-overlapping window of ``seq_len`` tokens of ``spec`` (documents joined by EOS)."""
    from ..data.windows import token_stream

    stream = token_stream(tokenizer, spec)
    slots = stream.numel() // seq_len
    if slots < 1:
        raise VacError(f"too little text in '{spec}': {stream.numel()} tokens, windows of {seq_len} needed")
    return Samples.windows(stream[: slots * seq_len].view(slots, seq_len))


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'‘“(])")


def _title(label: str) -> str:
    corpus, _, doc = label.partition("/")
    if corpus == "web-bible" and doc:
        return f"the book of {doc} in the World English Bible"
    if corpus == "shakespeare" and doc:
        return f"Shakespeare's {doc.replace('_', ' ').title()}"
    if corpus == "austen" and doc:
        return f"Jane Austen's {doc}"
    return "the supplied text"


def builtin_chat(docs: list[tuple[str, str]], n: int = DISTILL_CHAT_SAMPLES) -> list[list[dict]]:
    """``n`` chat conversations derived deterministically from ``docs`` (label, text).

    Each takes four consecutive sentences of a document: the user asks to continue the first two,
    the assistant answers with a short, true remark on where the text comes from in ``<think>`` tags
    followed by the next two sentences, verbatim. Passages are spread evenly over the documents.
    """
    candidates: list[list[list[dict]]] = []
    for label, text in docs:
        sentences = _SENTENCE.split(" ".join(text.split()))
        ok = [3 <= len(s.split()) <= 50 for s in sentences]
        per_doc = []
        for i in range(0, len(sentences) - 3, 4):
            if not all(ok[i:i + 4]):
                continue
            prompt, continuation = " ".join(sentences[i:i + 2]), " ".join(sentences[i + 2:i + 4])
            think = (f"<think>The passage is from {_title(label)}; the answer continues it directly, "
                     "in the same voice.</think>")
            per_doc.append([
                {"role": "user", "content": f"Continue this passage: {prompt}"},
                {"role": "assistant", "content": f"{think} {continuation}"},
            ])
        if per_doc:
            candidates.append(per_doc)
    if not candidates:
        return []
    # round-robin over documents, each document's passages taken evenly spaced
    take = max(1, math.ceil(n / len(candidates)))
    spread = [[c[round(j * len(c) / min(take, len(c)))] for j in range(min(take, len(c)))] for c in candidates]
    out = [conv for j in range(take) for doc in spread if j < len(doc) for conv in [doc[j]]]
    return out[:n]


def read_chat_jsonl(path: str | os.PathLike) -> list[list[dict] | str]:
    """Conversations of a jsonl file whose lines are ``{"messages": [{"role": ..., "content": ...}, ...]}``,
    or ``{"text": ...}``: a conversation already rendered with the chat template (what ``vac self-text``
    writes: the dense model's own answers, so the student is distilled on the teacher's distribution)."""
    path = Path(path)
    if not path.is_file():
        raise VacError(f"no such chat file: {path}")
    from ..data.specs import jsonl_records

    convs = []
    for number, record in jsonl_records(path):
        if isinstance(record, dict) and isinstance(record.get("text"), str) and "messages" not in record:
            convs.append(record["text"])
            continue
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise VacError(f"{path}:{number} needs {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}} "
                           "or {\"text\": ...}")
        convs.append(messages)
    if not convs:
        raise VacError(f"{path} holds no conversations")
    return convs


def render_chat(tokenizer, conversations: list[list[dict] | str], seq_len: int) -> Samples:
    """Conversations rendered with the tokenizer's chat template (a string: rendered already), truncated
    and right-padded to ``seq_len``."""
    if not getattr(tokenizer, "chat_template", None):
        raise VacError("the tokenizer has no chat template; pass --chat-fraction 0")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(conversations), seq_len), pad if pad is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(conversations), seq_len), dtype=torch.bool)
    for row, conv in enumerate(conversations):
        text = conv if isinstance(conv, str) else tokenizer.apply_chat_template(conv, tokenize=False)
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = True
    return Samples(ids, mask)


def check_no_overlap(train: str, evaluation: str | None) -> None:
    """Refuse training text that shares documents with the evaluation text."""
    from ..data.specs import check_disjoint

    check_disjoint([("training", train, "evaluation", evaluation, "--data", " (e.g. a :calib split)")])


def build_mix(tokenizer, data: str, seq_len: int, chat_fraction: float = DISTILL_CHAT_FRACTION,
              chat_data: str | None = None, chat_samples: int = DISTILL_CHAT_SAMPLES, seed: int = 0) -> DataMix:
    """The CLI's data: windows of ``data`` plus chat samples (from ``chat_data`` jsonl or built from ``data``)."""
    from ..data.specs import read_source

    text = text_windows(tokenizer, data, seq_len)
    chat = None
    if chat_fraction > 0:
        convs = read_chat_jsonl(chat_data) if chat_data else builtin_chat(read_source(data), chat_samples)
        if not convs:
            raise VacError(f"could not derive chat samples from '{data}'; pass --chat-data or --chat-fraction 0")
        chat = render_chat(tokenizer, convs, seq_len)
    return DataMix(text, chat, chat_fraction, seed)
