"""Chat fidelity: the dense model agrees with its own greedy answers; a damaged one agrees less."""

import copy
import json

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from vac.core.fidelity import chat_fidelity, reference_answers
from vac.data.prompts import PROMPTS, prompts
from vac.errors import VacError

TEMPLATE = "{% for m in messages %}{{ m['content'] }} <eos> {% endfor %}{% if add_generation_prompt %}w1 {% endif %}"
ASK = ("w3 w5 w7 w9", "w10 w2 w4", "w20 w21 w22 w23 w24")


def test_dense_agrees_with_itself_and_a_damaged_model_less(tmp_path):
    torch.manual_seed(0)
    model, tok = tiny_llama(layers=2), tiny_tokenizer()
    tok.chat_template = TEMPLATE
    refs = reference_answers(model, tok, ASK, max_new_tokens=8)
    assert [r["prompt"] for r in refs] == list(ASK) and all(len(r["answer_ids"]) >= 1 for r in refs)
    dense = chat_fidelity(model, refs)
    assert dense["top1_agreement"] == 1.0 and dense["tokens"] == sum(len(r["answer_ids"]) for r in refs)
    damaged = copy.deepcopy(model)
    with torch.no_grad():  # a model that answers differently: its first layer's MLP output scaled up
        damaged.model.layers[0].mlp.down_proj.weight.mul_(30.0)
    worse = chat_fidelity(damaged, refs)
    assert worse["top1_agreement"] < 1.0 and worse["answer_ppl"] > dense["answer_ppl"]


def test_prompt_halves_are_disjoint():
    assert len(PROMPTS["calib"]) == len(PROMPTS["eval"]) == 24 and len(PROMPTS["search"]) == 12
    everything = [p for half in PROMPTS.values() for p in half]
    assert len(everything) == len(set(everything))
    assert "What is 38 + 47? Show your work." in prompts("eval")  # the model card's question
    with pytest.raises(VacError, match="unknown prompt split"):
        prompts("train")


def test_self_generated_text_is_the_models_own_chat_and_reads_as_a_data_source(tmp_path):
    from vac.data.selftext import self_text
    from vac.data.specs import read_source

    torch.manual_seed(0)
    model, tok = tiny_llama(layers=2), tiny_tokenizer()
    tok.chat_template = TEMPLATE
    texts = self_text(model, tok, ASK, samples=2, max_new_tokens=6, seed=3)
    assert len(texts) == 2 * len(ASK)
    assert all(t.startswith(f"{p} <eos> w1 ") for t, p in zip(texts, ASK * 2)) and texts[:3] != texts[3:]
    assert texts == self_text(model, tok, ASK, samples=2, max_new_tokens=6, seed=3)  # seeded
    path = tmp_path / "self.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert [t for _, t in read_source(str(path))] == texts
    tok.chat_template = None
    with pytest.raises(VacError, match="needs a chat template"):
        self_text(model, tok, ASK)


def test_self_text_command_writes_the_conversations(tmp_path):
    from typer.testing import CliRunner

    from vac.cli import app
    from vac.data.prompts import PROMPTS

    model, tok = tiny_llama(layers=2), tiny_tokenizer()
    tok.chat_template = TEMPLATE
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = ["self-text", str(tmp_path / "m"), "--out", str(tmp_path / "self.jsonl"), "--samples", "1",
            "--max-new-tokens", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "self.jsonl").read_text().splitlines()
    assert len(lines) == len(PROMPTS["calib"]) and all(json.loads(x)["text"] for x in lines)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
