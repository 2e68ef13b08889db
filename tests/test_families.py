"""Every family of the table: a tiny random model compresses, saves, and reloads through transformers'
remote-code path (the shipped files, rendered for that family alone) with the same logits."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import VOCAB, tokens

import vac
from vac import checkpoint
from vac.errors import VacError
from vac.models.families import FAMILIES, arch_for

TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=None)
EXTRA = {"gemma2": dict(head_dim=16, sliding_window=8), "gemma3_text": dict(head_dim=16, sliding_window=8)}


def tiny(name: str):
    family = FAMILIES[name]
    config = getattr(transformers, family.config_class)(**TINY, **EXTRA.get(name, {}))
    torch.manual_seed(0)
    return getattr(importlib.import_module(family.model_module), family.model_class)(config).eval()


def test_the_table_covers_the_families_users_ask_for():
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo3", "gemma2", "gemma3_text", "phi3"}


PLAIN = """
import sys, torch, transformers
sys.modules["vac"] = None  # plain transformers: vac must not be importable here
ids = torch.load(sys.argv[1])
out = {}
for folder in sys.argv[2:]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        out[folder] = model(ids).logits
torch.save(out, sys.argv[1] + ".out")
"""


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """Every family compressed and saved, plus its logits: in this process and in plain transformers."""
    root = tmp_path_factory.mktemp("families")
    ids = tokens(8, 32)
    cfg = vac.CompressConfig.of(ratio=1.5, rank_step=4, rank_floor=4, fisher_windows=4, calib_windows=8,
                                seq_len=32, batch_size=4)
    done = {}
    for name in sorted(FAMILIES):
        model = tiny(name)
        result = vac.compress(model, None, cfg, calibration=ids, progress=False)
        vac.save(model, None, root / name)
        with torch.no_grad():
            done[name] = (model, result, model(ids[:2]).logits)
    torch.save(ids[:2], root / "ids.pt")
    run = subprocess.run([sys.executable, "-c", PLAIN, str(root / "ids.pt"), *(str(root / n) for n in sorted(FAMILIES))],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    plain = torch.load(root / "ids.pt.out")
    return root, ids[:2], done, {name: plain[str(root / name)] for name in FAMILIES}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_compresses_and_reloads_through_plain_transformers(name, compressed):
    root, ids, done, plain = compressed
    model, result, ref = done[name]
    assert arch_for(model).family == name
    paths = arch_for(model).decoder_linears(2)
    assert result.ratio >= 1.5 and result.ranks and set(result.ranks) <= set(paths)
    assert checkpoint.rank_map(model) == result.ranks  # the knapsack may keep a matrix dense
    shipped = {f: (root / name / f).read_text() for f in ("configuration_vac.py", "modeling_vac.py")}
    imports = re.findall(r"^from (\S+) import", "".join(shipped.values()), re.M)
    # self-contained: torch, transformers and the sibling file only, and no other family's module
    assert all(m.split(".")[0] in ("torch", "transformers", "") for m in imports), imports
    assert [m for m in imports if m.startswith("transformers.models.")] == [FAMILIES[name].model_module]
    torch.testing.assert_close(plain[name], ref, atol=1e-5, rtol=1e-5)
    again, _ = vac.load(str(root / name))  # import vac: no remote code needed
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_unknown_family_is_one_line(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB)
    with pytest.raises(VacError, match="unsupported architecture 'gpt2'; supported: gemma2, "):
        vac.compress(transformers.GPT2LMHeadModel(config), None, calibration=tokens(2, 8))


def test_low_rank_linear_merges_back_to_dense():
    model = tiny("llama")
    vac.factorize_(model, {"model.layers.0.mlp.down_proj": 12})
    low = model.get_submodule("model.layers.0.mlp.down_proj")
    dense = low.to_dense()
    assert type(dense) is torch.nn.Linear and dense.weight.shape == (64, 160)
    x = torch.randn(3, 160)
    torch.testing.assert_close(dense(x), low(x), atol=1e-5, rtol=1e-5)
    assert checkpoint.rank_map(model) == {"model.layers.0.mlp.down_proj": 12}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_distillation_loss_from_hidden_states_matches_the_logits(name):
    """The distillation loss takes each family's final hidden states through its forward and applies
    the head (and Gemma's final soft cap) itself: the same KL/NLL as on the model's own logits."""
    from vac.recover.distill import _final_hidden, _softcap
    from vac.recover.loss import head_kd_loss, kd_sums

    model = tiny(name)
    ids = tokens(2, 24)
    mask = torch.ones(2, 23, dtype=torch.bool)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        teacher = logits.flip(-1)  # any other distribution over the vocabulary
        kl, nll, n = kd_sums(logits, ids[:, 1:], mask, 1.0, teacher_topk=teacher.topk(8, dim=-1))
        _, kl2, nll2, n2 = head_kd_loss(_final_hidden(model, ids), model.get_output_embeddings(), ids[:, 1:], mask,
                                        1.0, 0.5, 0.5, teacher_topk=teacher.topk(8, dim=-1), chunk=7,
                                        softcap=_softcap(model))
    assert n2 == n and kl2.item() == pytest.approx(kl.item(), rel=1e-4)
    assert nll2.item() == pytest.approx(nll.item(), rel=1e-5)
