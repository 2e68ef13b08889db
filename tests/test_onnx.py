"""vac export --onnx and the ONNX Runtime loop on tiny models: the same logits and greedy tokens as
transformers on prefill and cached decode steps, the int8 variant close, the bench and chat paths,
and the one-line errors."""

import json

import onnx_ir
import pytest
import torch
from conftest import VOCAB, tiny_llama
from test_use import tiny_tokenizer
from typer.testing import CliRunner

import vac
from vac import checkpoint
from vac.cli import app
from vac.deploy.bench_onnx import bench_onnx
from vac.deploy.chat import generate_reply
from vac.deploy.onnx_export import OnnxExportConfig, decoder_matmuls, export_onnx
from vac.deploy.onnx_runtime import OnnxCausalLM
from vac.errors import VacError
from vac.models.layers import factorize_

runner = CliRunner()
RANKS = {f"model.layers.{i}.{name}": 8 for i in range(2) for name in
         ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny vac checkpoint, its dense model, and their ONNX exports (fp32; int8 of the vac one)."""
    root = tmp_path_factory.mktemp("onnx")
    dense = tiny_llama(layers=2, tie=False)
    dense.save_pretrained(root / "dense")
    tiny_tokenizer().save_pretrained(root / "dense")
    checkpoint.save(factorize_(tiny_llama(layers=2, tie=False), RANKS), tiny_tokenizer(), root / "vac")
    summaries = {
        "vac-onnx": export_onnx(root / "vac", root / "vac-onnx"),
        "vac-int8": export_onnx(root / "vac", root / "vac-int8", OnnxExportConfig(int8=True)),
        "vac-plain": export_onnx(root / "vac", root / "vac-plain", OnnxExportConfig(fusions=False)),
        "dense-onnx": vac.export_onnx(root / "dense", root / "dense-onnx"),  # the public entry point
    }
    return root, summaries


def prompt(n=10, seed=3):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def test_each_factor_is_two_matmuls_and_the_manifest_describes_the_graph(folders):
    root, summaries = folders
    plain = onnx_ir.load(str(root / "vac-plain" / "model.onnx"))
    fused = onnx_ir.load(str(root / "vac-onnx" / "model.onnx"))
    # 2 layers x (3 dense + 4 factorized linears as 2 MatMuls each)
    assert len(decoder_matmuls(plain)) == 2 * (3 + 4 * 2) == 22
    # ORT's CPU fusions pack the products that read one input (k, v and q.down; up and gate.down) and
    # put attention and the norms into single kernels
    ops = [node.op_type for node in fused.graph]
    # per layer: [q.down k v], q.up, o.down, o.up, [gate.down up], gate.up, down.down, down.up
    assert len(decoder_matmuls(fused)) == 2 * 8
    assert ops.count("GroupQueryAttention") == 2 and len(ops) < 0.6 * len(list(plain.graph))
    manifest = json.loads((root / "vac-onnx" / "vac_onnx.json").read_text())
    assert manifest["kind"] == "vac" and summaries["dense-onnx"]["kind"] == "dense"
    assert manifest["cache"]["inputs"] == [f"input.cache.layers.{i}.{kv}" for i in range(2) for kv in ("keys", "values")]
    assert manifest["cache"]["shapes"]["input.cache.layers.0.keys"] == [1, 2, None, 16]
    model = checkpoint.load(root / "vac")[0]
    assert manifest["params"] == sum(p.numel() for p in model.parameters())
    for name in ("tokenizer.json", "config.json", "README.md", "model.onnx.data"):
        assert (root / "vac-onnx" / name).is_file()


@pytest.mark.parametrize("name, source", [("vac-onnx", "vac"), ("vac-plain", "vac"), ("dense-onnx", "dense")])
def test_prefill_and_cached_decode_logits_equal_transformers(folders, name, source):
    root, _ = folders
    model = checkpoint.load(root / source)[0]
    ort = OnnxCausalLM(root / name, threads=1)
    ids = prompt(12)
    with torch.no_grad():
        full = model(ids).logits[0]
    # prefill of the first 9 tokens in one run, then 3 cached single-token steps
    logits, cache = ort.step(ids[:, :9].numpy(), 0, ort.empty_cache())
    got = [torch.from_numpy(logits.copy())]
    for t in range(9, 12):
        logits, cache = ort.step(ids[:, t:t + 1].numpy(), t, cache)
        got.append(torch.from_numpy(logits.copy()))
    assert cache[0].shape() == [1, 2, 12, 16]
    err = (torch.stack(got) - full[8:]).abs().max().item()
    assert err < 1e-4, err
    assert full.abs().max() > 0.5  # the comparison is not between near-zero logits


def test_greedy_generation_is_identical_and_sampling_is_seeded(folders):
    root, _ = folders
    model = checkpoint.load(root / "vac")[0]
    ort = OnnxCausalLM(root / "vac-onnx", threads=1)
    ids = prompt(7)
    reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    assert torch.equal(ort.generate(ids, max_new_tokens=24), reference)
    torch.manual_seed(5)
    a = ort.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9)
    torch.manual_seed(5)
    b = ort.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9)
    assert torch.equal(a, b) and a.shape == (1, 19) and not torch.equal(a, reference[:, :19])
    stopped = ort.generate(ids, max_new_tokens=24, eos_token_id=int(reference[0, 9]))
    assert stopped.shape[1] <= 10 and stopped[0, -1] == reference[0, 9]


def test_int8_export_is_smaller_and_close(folders):
    root, summaries = folders
    graph = onnx_ir.load(str(root / "vac-int8" / "model.onnx"))
    ops = {node.op_type for node in graph.graph}
    assert summaries["vac-int8"]["int8_matmuls"] == 16  # every decoder MatMul of the fused graph
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, ops
    model = checkpoint.load(root / "vac")[0]
    ids = prompt(12)
    with torch.no_grad():
        ref = model(ids).logits[0]
    got = OnnxCausalLM(root / "vac-int8", threads=1).logits(ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 1e-5 < rel < 0.05, rel  # quantized (not bit-equal), and close
    assert summaries["vac-int8"]["weights_bytes"] < summaries["vac-onnx"]["weights_bytes"]


def test_chat_reply_through_onnx_runtime_matches_torch(folders):
    root, _ = folders
    model, tok = checkpoint.load(root / "vac")
    ort = OnnxCausalLM(root / "vac-onnx", threads=1)
    messages = [{"role": "user", "content": "hi"}]
    want = generate_reply(model, tok, messages, max_new_tokens=10, temperature=0)
    assert generate_reply(ort, tok, messages, max_new_tokens=10, temperature=0) == want
    result = runner.invoke(app, ["chat", str(root / "vac-onnx"), "--runtime", "onnx", "-p", "hi",
                                 "--max-new-tokens", "10", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == want[1]


def test_bench_onnx_times_every_model_and_reports_the_flop_limits(folders):
    root, _ = folders
    result = bench_onnx(root / "vac-onnx", root / "dense-onnx", prompt_len=16, decode_tokens=4, repeats=1, threads=1)
    assert set(result["models"]) == {"dense-onnx", "vac-onnx", "dense-eager"}
    for m in result["models"].values():
        assert m["decode_tokens_per_s"] > 0 and m["prefill_tokens_per_s"] > 0
    model = checkpoint.load(root / "vac")[0]
    from vac.deploy.bench import linear_macs

    dense_macs = result["models"]["dense-onnx"]["linear_macs_per_token"]
    assert result["flops_ratio"] == pytest.approx(dense_macs / linear_macs(model))
    assert result["flops_ratio"] > 1 and result["decode_speedup"] > 0 and "vs_eager_decode_speedup" in result


def one_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_bad_inputs_get_one_line_errors(folders, tmp_path):
    root, _ = folders
    (tmp_path / "empty").mkdir()
    cases = [
        (["export", str(tmp_path / "empty"), "--onnx", str(tmp_path / "x")], "not a model folder"),
        (["export", str(tmp_path / "missing"), "--onnx", str(tmp_path / "x")], "no such model folder"),
        (["export", str(root / "vac"), "--onnx", str(root / "vac-onnx")], "already exists"),
        (["export", str(root / "vac"), "--onnx", str(root / "vac" / "sub")], "overlaps"),
        (["chat", str(root / "vac"), "--runtime", "onnx", "-p", "hi"], "not a vac ONNX export"),
        (["bench", str(root / "vac"), "--runtime", "tpu"], "unknown --runtime"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in one_line(result.stderr), (args, result.stderr)
    assert not (tmp_path / "x").exists() and not (root / "vac" / "sub").exists()
    with pytest.raises(VacError, match="one sequence at a time"):
        OnnxCausalLM(root / "vac-onnx").generate(torch.zeros(2, 3, dtype=torch.long))
