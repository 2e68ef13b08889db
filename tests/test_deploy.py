"""Deployment: INT8 factors (torchao) round trip, lean loading, the bench command's JSON."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB, tiny_llama, tokens
from test_checkpoint import some_ranks
from transformers import LlamaConfig, LlamaForCausalLM

from vac import checkpoint
from vac.deploy.bench import linear_macs, load_peak_rss
from vac.deploy.compat import fast_int8_loading
from vac.deploy.decode import fast_decode_
from vac.deploy.quantize import quantize_checkpoint
from vac.errors import VacError
from vac.models.layers import LowRankLinear, factorize_

pytest.importorskip("torchao")
from torchao.quantization import Int8Tensor  # noqa: E402

PLAIN_LOAD = """
import sys, torch
sys.modules["vac"] = None  # vac must not be importable
from transformers import AutoModelForCausalLM
ids, ref = torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
w = model.get_submodule("model.layers.0.mlp.down_proj").up.weight
assert type(w).__name__ == "Int8Tensor", type(w)
print((model(ids).logits - ref).abs().max().item())
print(model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False).shape[1])
"""


@pytest.fixture
def ckpt(tmp_path):
    model = factorize_(tiny_llama(), some_ranks(tiny_llama()))
    checkpoint.save(model, None, tmp_path / "ckpt", extra={"report.json": {"model": "tiny"}})
    return tmp_path / "ckpt"


@pytest.mark.parametrize("scheme", ["weight-only", "dynamic"])
def test_int8_roundtrip_close_to_fp32(tmp_path, ckpt, scheme):
    summary = quantize_checkpoint(ckpt, tmp_path / "q8", scheme=scheme)
    assert summary["quantized_linears"] == 2 * len(some_ranks(tiny_llama()))
    assert summary["size_after_bytes"] < summary["size_before_bytes"]
    config = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert json.loads((tmp_path / "q8" / "quantize.json").read_text()) == summary
    assert json.loads((tmp_path / "q8" / "report.json").read_text()) == {"model": "tiny"}  # carried over

    fp32, _ = checkpoint.load(ckpt)
    q8, _ = checkpoint.load(tmp_path / "q8")
    layer = q8.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, LowRankLinear) and isinstance(layer.down.weight, Int8Tensor)
    assert type(q8.get_submodule("model.layers.1.self_attn.k_proj").weight) is torch.nn.Parameter  # dense stays
    ids = tokens()
    with torch.no_grad():
        ref, got = fp32(ids).logits, q8(ids).logits
    # per-row int8 of the factors: measured max |Δlogit| ≈ 0.001 (weight-only), 0.002 (dynamic) on
    # logits of magnitude ~1.2; the bound leaves 10x room
    assert (got - ref).abs().max().item() < 0.02
    assert not torch.equal(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_int8_reloads_with_plain_transformers(tmp_path, ckpt):
    """Plain transformers (stock torchao loading, no vac) gives exactly the logits vac's load gives."""
    quantize_checkpoint(ckpt, tmp_path / "q8")
    fast_int8_loading()  # the reference is loaded through the patched (linear-time) path
    import transformers.integrations.torchao as hf_torchao

    assert getattr(hf_torchao.unflatten_tensor_state_dict, "_vac_fast", False)
    q8, _ = checkpoint.load(tmp_path / "q8")
    ids = tokens(2, 16)
    with torch.no_grad():
        ref = q8(ids).logits
    torch.save((ids, ref), tmp_path / "ref.pt")
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "q8"), str(tmp_path / "ref.pt")],
        capture_output=True, text=True, cwd=tmp_path, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    diff, length = proc.stdout.split()[-2:]
    assert float(diff) == 0.0
    assert int(length) == 9


def test_quantize_refuses_bad_inputs(tmp_path, ckpt):
    with pytest.raises(VacError, match="unknown int8 scheme"):
        quantize_checkpoint(ckpt, tmp_path / "a", scheme="int4")
    quantize_checkpoint(ckpt, tmp_path / "q8")
    with pytest.raises(VacError, match="already exists"):
        quantize_checkpoint(ckpt, tmp_path / "q8")
    with pytest.raises(VacError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q8", tmp_path / "q8q8")
    tiny_llama().save_pretrained(tmp_path / "dense")
    with pytest.raises(VacError, match="no LowRankLinear"):
        quantize_checkpoint(tmp_path / "dense", tmp_path / "d8")
    assert not (tmp_path / "a").exists() and not (tmp_path / "d8").exists()


def test_fast_decode_keeps_outputs(ckpt):
    model, _ = checkpoint.load(ckpt)
    ids = tokens(2, 12)
    with torch.no_grad():
        ref = model(ids).logits
        gen = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
        assert fast_decode_(model) == len(some_ranks(tiny_llama()))
        up = model.get_submodule("model.layers.0.mlp.down_proj").up.weight
        assert up.stride() == (1, up.shape[0])
        assert torch.allclose(model(ids).logits, ref, atol=1e-5)
        assert torch.equal(model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False), gen)
    with torch.inference_mode():
        assert torch.equal(model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False), gen)


def test_loading_never_materializes_the_dense_model(tmp_path):
    """Peak RSS increase of checkpoint.load (fresh process, after imports) ≤ 1.3x the weights on disk."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    ranks = {f"model.layers.{i}.{name}": rank for i in range(4) for name, rank in [
        ("self_attn.q_proj", 128), ("self_attn.k_proj", 64), ("self_attn.v_proj", 64), ("self_attn.o_proj", 128),
        ("mlp.gate_proj", 200), ("mlp.up_proj", 200), ("mlp.down_proj", 200)]}
    dense_macs = linear_macs(model)
    # cheap factors: only the memory behaviour of loading is under test
    factorize_(model, ranks, factors=lambda _p, w, r: (w[:, :r].clone(), w[:r, :].clone()))
    assert dense_macs / linear_macs(model) > 1.6  # the dense model would need > 1.6x the memory
    checkpoint.save(model, None, tmp_path / "ckpt")
    del model
    result = load_peak_rss(tmp_path / "ckpt")
    assert result["weights_bytes"] > 40e6
    assert result["ratio"] <= 1.3, result
    # what does grow: the weights, mmap-backed, not anonymous copies of them
    assert result["growth_by_kind"]["anonymous"] < 0.2 * result["weights_bytes"], result


def test_bench_cli_json(tmp_path):
    from typer.testing import CliRunner

    import vac.cli
    import vac.cli.deploy  # noqa: F401  (registers quantize and bench)

    dense = tiny_llama()
    dense.save_pretrained(tmp_path / "dense")
    checkpoint.save(factorize_(tiny_llama(), some_ranks(tiny_llama())), None, tmp_path / "ckpt",
                    extra={"report.json": {"model": str(tmp_path / "dense")}})
    runner = CliRunner()
    q = runner.invoke(vac.cli.app, ["quantize", str(tmp_path / "ckpt"), "--out", str(tmp_path / "q8"), "--json"])
    assert q.exit_code == 0, q.output
    assert json.loads(q.stdout)["size_after_bytes"] < json.loads(q.stdout)["size_before_bytes"]

    args = ["bench", str(tmp_path / "ckpt"), "--int8", str(tmp_path / "q8"), "--prompt-len", "16",
            "--decode-tokens", "4", "--repeats", "1", "--threads", "1", "--no-load-rss", "--compare-stock", "--json"]
    res = runner.invoke(vac.cli.app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("decode_speedup", "prefill_speedup", "flops_ratio", "threads", "int8_decode_speedup",
                "int8_prefill_speedup", "stock_decode_speedup", "models", "protocol", "process_peak_rss_bytes"):
        assert key in out, key
    assert out["threads"] == 1 and out["baseline"] == str(tmp_path / "dense")
    assert set(out["models"]) == {"dense", "vac", "vac-stock", "int8"}
    for m in out["models"].values():
        for key in ("params", "linear_macs_per_token", "disk_bytes", "resident_bytes",
                    "prefill_tokens_per_s", "decode_tokens_per_s"):
            assert m[key] is not None and m[key] > 0, (key, m)
    assert out["models"]["vac"]["params"] < out["models"]["dense"]["params"]
    assert out["flops_ratio"] == pytest.approx(
        out["models"]["dense"]["linear_macs_per_token"] / out["models"]["vac"]["linear_macs_per_token"])
    assert out["flops_ratio"] > 1
    # prefill keeps the last logits only: the decoder's linears per prompt token, the LM head once
    dense, vac_ = out["models"]["dense"], out["models"]["vac"]
    head = VOCAB * 64  # tiny_llama: tied head, hidden 64
    for m in (dense, vac_):
        assert m["prefill_macs"] == (m["linear_macs_per_token"] - head) * 16 + head
    assert out["prefill_flops_ratio"] == pytest.approx(dense["prefill_macs"] / vac_["prefill_macs"])
    assert out["prefill_flops_ratio"] > out["flops_ratio"]
    assert out["models"]["int8"]["disk_bytes"] < out["models"]["vac"]["disk_bytes"]

    table = runner.invoke(vac.cli.app, args[:-1])  # rich table
    assert table.exit_code == 0 and "decode" in table.stdout


def test_bench_needs_a_baseline(tmp_path):
    from typer.testing import CliRunner

    import vac.cli
    import vac.cli.deploy  # noqa: F401

    checkpoint.save(factorize_(tiny_llama(), some_ranks(tiny_llama())), None, tmp_path / "ckpt")
    res = CliRunner().invoke(vac.cli.app, ["bench", str(tmp_path / "ckpt"), "--json"])
    assert res.exit_code == 2
    assert "--baseline" in res.stderr and res.stderr.strip().count("\n") == 0


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile needs a C++ compiler")
def test_bench_compiled_matches_the_protocol(tmp_path):
    """--compile: both models through torch.compile (static KV cache); same schema, stated protocol."""
    from vac.deploy.bench import bench

    tiny_llama(layers=1).save_pretrained(tmp_path / "dense")
    checkpoint.save(factorize_(tiny_llama(layers=1), some_ranks(tiny_llama(layers=1))), None, tmp_path / "ckpt")
    out = bench(tmp_path / "ckpt", str(tmp_path / "dense"), prompt_len=8, decode_tokens=2, repeats=1, threads=1,
                load_rss=False, use_compile=True)
    assert out["compiled"] is True and "torch.compile" in out["protocol"]
    assert out["models"]["vac"]["fast_decode"] and out["decode_speedup"] > 0 and out["prefill_speedup"] > 0


def test_bench_prefill_applies_the_lm_head_to_the_last_position_only():
    """vac bench's prefill is generate's first token: the head sees one position, as the FLOP ratio assumes."""
    from vac.deploy.bench import greedy_generate

    model, seen = tiny_llama(), []
    model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    with torch.inference_mode():
        greedy_generate(model, tokens(1, 16), 1)
    assert seen == [(1, 1, 64)]
