"""Chat fidelity: does the compressed model still answer like the dense one?

The dense model answers held-out chat prompts (:data:`vac.data.prompts.PROMPTS` ``eval``) greedily,
through its chat template; those answers are the reference. A compressed model is then run on each
prompt + reference answer (teacher forcing, one forward each) and scored on the answer tokens:
**top-1 agreement** (its most likely next token is the dense model's) and the **PPL** of the
reference answer. Text PPL measures language modelling; this measures what a chat user sees.

References are generated once per dense model and cached (``$VAC_HOME/fidelity``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_NEW_TOKENS = 64  # answer length scored: long enough for a short answer, cheap on a CPU


@torch.no_grad()
def reference_answers(model, tokenizer, prompts: tuple[str, ...], max_new_tokens: int = MAX_NEW_TOKENS,
                      source: str | None = None) -> list[dict]:
    """``[{"prompt", "prompt_ids", "answer_ids"}]``: the greedy answers of ``model`` (the dense one),
    cached by model folder ``source`` when given."""
    from ..cache import cache_dir, cache_key, cached_json
    from ..deploy.chat import render_prompt, stop_token_ids

    key = cache_key(source, "fidelity/1", list(prompts), max_new_tokens)
    path = cache_dir() / "fidelity" / f"{key}.json" if key else None

    def compute() -> dict:
        model.eval()
        device = next(model.parameters()).device
        stops = stop_token_ids(model, tokenizer)
        rows = []
        for prompt in prompts:
            text = render_prompt(tokenizer, [{"role": "user", "content": prompt}])
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stops or None,
                                 pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None
                                 else tokenizer.pad_token_id)
            rows.append({"prompt": prompt, "prompt_ids": ids[0].tolist(), "answer_ids": out[0, ids.shape[1]:].tolist()})
        return {"answers": rows}

    return cached_json(path, compute)["answers"]


@torch.no_grad()
def chat_fidelity(model, references: list[dict]) -> dict:
    """``{"top1_agreement", "answer_ppl", "tokens", "prompts"}`` of ``model`` on the reference answers."""
    model.eval()
    device = next(model.parameters()).device
    agree, nll, count = 0, 0.0, 0
    for ref in references:
        answer = ref["answer_ids"]
        if not answer:
            continue
        ids = torch.tensor([ref["prompt_ids"] + answer], device=device)
        start = len(ref["prompt_ids"])
        logits = model(input_ids=ids, use_cache=False).logits[0, start - 1:-1].float()
        target = ids[0, start:]
        agree += int((logits.argmax(-1) == target).sum())
        nll += F.cross_entropy(logits, target, reduction="sum").item()
        count += target.numel()
    if count == 0:
        return {"top1_agreement": None, "answer_ppl": None, "tokens": 0, "prompts": len(references)}
    return {"top1_agreement": agree / count, "answer_ppl": math.exp(nll / count), "tokens": count,
            "prompts": len(references)}
