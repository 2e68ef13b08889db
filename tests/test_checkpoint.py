"""Checkpoint format: save → load in a Python without vac → identical logits."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama, tiny_olmo3, tokens

from vac import checkpoint
from vac.atomic import atomic_dir
from vac.errors import VacError
from vac.models.layers import LowRankLinear, factorize_

PLAIN_LOAD = """
import sys, torch
sys.modules["vac"] = None  # vac must not be importable
from transformers import AutoModelForCausalLM
ids, ref, dtype = torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=dtype)
logits = model(ids).logits
print((logits.float() - ref.float()).abs().max().item())
gen = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
print(gen.shape[1])
"""


def some_ranks(model, head=False):
    layers = model.config.num_hidden_layers
    ranks = {f"model.layers.{i}.self_attn.q_proj": 8 for i in range(layers)}
    ranks |= {f"model.layers.{i}.mlp.down_proj": 12 + i for i in range(layers)}
    ranks["model.layers.0.self_attn.k_proj"] = 5
    if head:
        ranks["lm_head"] = 16
    return ranks


def roundtrip_plain(model, tmp_path, dtype=torch.float32):
    """Save, then load in a subprocess where vac is not importable; max |logit difference| against
    the same checkpoint loaded by vac, and the length of a short greedy generation."""
    ids = tokens(2, 16)
    checkpoint.save(model, None, tmp_path / "ckpt", dtype=dtype)
    reference, _ = checkpoint.load(tmp_path / "ckpt", dtype=dtype)
    with torch.no_grad():
        ref = reference(ids).logits
        assert (ref.float() - model.to(dtype)(ids).logits.float()).abs().max() < (0.1 if dtype == torch.bfloat16 else 1e-6)
    torch.save((ids, ref, dtype), tmp_path / "ref.pt")
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "ckpt"), str(tmp_path / "ref.pt")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    diff, length = proc.stdout.split()
    return float(diff), int(length)


@pytest.mark.parametrize("tie", [True, False])
def test_llama_roundtrip_without_vac(tmp_path, tie):
    model = factorize_(tiny_llama(tie=tie), some_ranks(tiny_llama()))
    diff, length = roundtrip_plain(model, tmp_path)
    assert diff == 0.0
    assert length == 9
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "vac_llama"
    assert config["vac_ranks"]["model.layers.1.mlp.down_proj"] == 13
    assert config["tie_word_embeddings"] is tie
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_vac.VacLlamaForCausalLM"


def test_factorized_head_unties(tmp_path):
    model = factorize_(tiny_llama(tie=True), some_ranks(tiny_llama(), head=True))
    diff, _ = roundtrip_plain(model, tmp_path)
    assert diff == 0.0
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["tie_word_embeddings"] is False


def test_olmo3_sliding_window_roundtrip(tmp_path):
    model = factorize_(tiny_olmo3(), some_ranks(tiny_olmo3()))
    diff, _ = roundtrip_plain(model, tmp_path)
    assert diff == 0.0
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "vac_olmo3"
    assert config["sliding_window"] == 8 and config["layer_types"][0] == "sliding_attention"


def test_bf16_checkpoint(tmp_path):
    model = factorize_(tiny_llama(), some_ranks(tiny_llama()))
    diff, _ = roundtrip_plain(model, tmp_path, dtype=torch.bfloat16)
    assert diff == 0.0
    loaded, _ = checkpoint.load(tmp_path / "ckpt", dtype=None)
    assert loaded.dtype == torch.bfloat16


def test_load_with_import_vac_and_rank_map(tmp_path):
    ranks = some_ranks(tiny_llama())
    model = factorize_(tiny_llama(), ranks)
    checkpoint.save(model, None, tmp_path / "ckpt")
    loaded, _ = checkpoint.load(tmp_path / "ckpt")
    assert type(loaded).__name__ == "VacLlamaForCausalLM"
    assert checkpoint.rank_map(loaded) == ranks
    layer = loaded.get_submodule("model.layers.0.self_attn.k_proj")
    assert isinstance(layer, LowRankLinear) and layer.down.weight.shape == (5, 64)
    ids = tokens()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_loading_without_trust_remote_code_fails_loudly(tmp_path):
    checkpoint.save(factorize_(tiny_llama(), some_ranks(tiny_llama())), None, tmp_path / "ckpt")
    code = (
        "import sys; sys.modules['vac'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=False)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "trust_remote_code" in proc.stderr


def test_factorize_svd_is_exact_at_full_rank_and_respects_ranks():
    model = tiny_llama()
    path = "model.layers.0.mlp.gate_proj"
    dense = model.get_submodule(path).weight.detach().clone()
    factorize_(model, {path: 64})
    layer = model.get_submodule(path)
    assert torch.allclose(layer.up.weight @ layer.down.weight, dense, atol=1e-5)
    with pytest.raises(VacError, match="outside"):
        factorize_(tiny_llama(), {path: 65})
    with pytest.raises(VacError, match="not a module"):
        factorize_(tiny_llama(), {"model.layers.9.mlp.up_proj": 4})


def test_save_is_atomic_and_refuses_existing(tmp_path):
    model = factorize_(tiny_llama(), some_ranks(tiny_llama()))
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(VacError, match="already exists"):
        checkpoint.save(model, None, tmp_path / "ckpt")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with atomic_dir(tmp_path / "new") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise Boom
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_corrupt_checkpoints_give_one_line_errors(tmp_path):
    with pytest.raises(VacError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VacError, match="no config.json"):
        checkpoint.load(tmp_path / "empty")
    model = factorize_(tiny_llama(), some_ranks(tiny_llama()))
    checkpoint.save(model, None, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(VacError, match="cannot load checkpoint") as info:
        checkpoint.load(tmp_path / "ckpt")
    assert "\n" not in str(info.value)
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(VacError, match="cannot load checkpoint"):
        checkpoint.load(tmp_path / "ckpt")
