"""Layer-streamed compression: the same result as the in-memory driver, memory that does not grow with
the number of layers, the source's dtype kept."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import folder_weights, tiny_llama, tokens, word_text

import vac
from vac.config import CompressConfig
from vac.core.driver import compress
from vac.core.evaluate import perplexity
from vac.core.stream import stream_compress, stream_perplexity, streamable

BASE = dict(ratio=1.5, rank_step=4, rank_floor=4, fisher_windows=4, calib_windows=8, seq_len=32, batch_size=4)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    model = tiny_llama(layers=3)
    model.save_pretrained(root / "dense")
    return root, model


@pytest.mark.parametrize("settings", [
    dict(method="vac"), dict(method="vac", sequential=False, allocation="global"), dict(method="whiten"),
    dict(method="whiten", allocation="depth", sequential=True), dict(method="fwsvd", allocation="depth"),
    dict(method="asvd"), dict(method="svd", allocation="global"), dict(method="vac", order=(0, 1, 2)),
    dict(method="vac", refine="own", refine_steps=5, refine_lr=1e-3),
    dict(method="whiten", sequential=True, refine="dense", refine_steps=5, refine_lr=1e-3),
    # other orders: each layer from the nearest cached boundary below it, through the layers changed
    # since (the dense stream through their dense twins)
    dict(method="vac", order="middle-out"), dict(method="vac", order="back-to-front", refine="own", refine_steps=5),
    dict(method="vac", order=(1, 0, 2), refine="none"),  # layer 1 passed as stored to reach layer 2
], ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_streamed_equals_in_memory(dense, tmp_path, settings):
    root, model = dense
    cfg = CompressConfig.of(**BASE, **settings)
    ids = tokens(8, 32)
    reference = copy.deepcopy(model)
    expected = compress(reference, ids, cfg, progress=False)
    got = stream_compress(root / "dense", None, cfg, ids, tmp_path / "out", progress=False, stats_cache=False)
    assert got.ranks == expected.ranks and got.params_after == expected.params_after
    weights = folder_weights(tmp_path / "out")
    for name, tensor in reference.state_dict().items():
        if name != "lm_head.weight":  # tied to the embeddings, stored once
            torch.testing.assert_close(weights[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    loaded, _ = vac.load(str(tmp_path / "out"))
    ppl = perplexity(reference, ids[:4], progress=False)["ppl"]
    assert perplexity(loaded, ids[:4], progress=False)["ppl"] == pytest.approx(ppl, rel=1e-6)
    assert stream_perplexity(tmp_path / "out", ids[:4], progress=False)["ppl"] == pytest.approx(ppl, rel=1e-6)


def test_what_does_not_stream_is_named():
    assert streamable(CompressConfig.of(correct=True)) == "--correct"
    assert streamable(CompressConfig.of(order="middle-out")) is None
    assert streamable(CompressConfig.of()) is None


def test_an_order_that_steps_back_holds_more_boundaries_and_the_plan_counts_them(dense, tmp_path, monkeypatch):
    """Middle-out over 3 layers (1, 2, 0) re-runs layer 0 of both streams for the last step, and holds
    3 boundaries of a stream at once (front to back: 2); the factorization's memory figure grows by
    what the extra boundaries hold."""
    import vac.core.stream as stream_module
    from vac.core.driver import held_boundaries
    from vac.core.memory import Shapes, stage_bytes
    from vac.core.orders import layer_order

    root, _ = dense
    assert layer_order("middle-out", 3) == [1, 2, 0]
    assert held_boundaries([0, 1, 2]) == 2 and held_boundaries([1, 2, 0]) == 3
    loads, stages = [], {}
    real_load = stream_module.Layers.load
    monkeypatch.setattr(stream_module.Layers, "load",
                        lambda self, i, *a, **k: loads.append(i) or real_load(self, i, *a, **k))
    monkeypatch.setattr(stream_module, "stage", lambda name, needs=0: stages.setdefault(name, needs))
    stream_compress(root / "dense", None, CompressConfig.of(**BASE, order="middle-out"), tokens(8, 32),
                    tmp_path / "out", progress=False, stats_cache=False)
    # the factorization pass: layer 0 twice to reach layer 1 (both streams), layer 1, layer 2, layer 0
    factorize = loads[-5:]
    assert factorize == [0, 0, 1, 2, 0], loads
    model, reader = stream_module.skeleton(root / "dense", "meta")
    shapes = Shapes.of(model.config, stream_module.arch_for(model), lambda n: reader.shape(f"{n}.weight"))
    plan = dict(windows=8, seq_len=32, fisher_windows=4, batch_size=4, refine="dense")
    front, middle = (stage_bytes(shapes, **plan, held=h)["the factorization"] for h in (2, 3))
    assert middle - front == 2 * 8 * 32 * model.config.hidden_size * 4  # one more boundary in each stream
    assert stages["the factorization"] <= middle  # with the layer the rank map gives (at most the dense one)


@pytest.mark.parametrize("order,stop,written", [("middle-out", 2, [1, 2]), ("front-to-back", 1, [0]),
                                                ("back-to-front", 1, [2])])
def test_an_order_stopped_midway_resumes_to_the_same_checkpoint(dense, tmp_path, monkeypatch, order, stop, written):
    """Stopped after ``stop`` layers: the rerun takes the written layers as stored (the compressed
    stream) and passes them dense (the refinement's dense stream), and gives the uninterrupted run's
    checkpoint."""
    import vac.core.stream as stream_module

    root, _ = dense
    cfg = CompressConfig.of(**BASE, order=order)
    assert cfg.resolved().strategy.refine == "dense"
    stream_compress(root / "dense", None, cfg, tokens(8, 32), tmp_path / "ref", progress=False, stats_cache=False)
    passed = []

    def halt(name):
        passed.append(name)
        if passed.count("sequential") == stop:
            raise KeyboardInterrupt

    monkeypatch.setattr(stream_module, "kill_point", halt)
    with pytest.raises(KeyboardInterrupt):
        stream_compress(root / "dense", None, cfg, tokens(8, 32), tmp_path / "out", progress=False, stats_cache=False)
    work = tmp_path / ".out.partial"
    assert sorted(p.name for p in work.glob("model-layer-*")) == [f"model-layer-{i:05d}.safetensors" for i in written]
    monkeypatch.setattr(stream_module, "kill_point", lambda name: None)
    stream_compress(root / "dense", None, cfg, tokens(8, 32), tmp_path / "out", progress=False, stats_cache=False)
    expected, got = folder_weights(tmp_path / "ref"), folder_weights(tmp_path / "out")
    assert expected.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


@pytest.mark.parametrize("family", ["llama", "qwen3", "olmo3", "gemma2", "gemma3_text", "phi3"])
def test_streamed_perplexity_of_every_family_equals_the_model(family, tmp_path):
    """The embedding (with the final norm) and the head are loaded only for a pass's first and last
    step; the model's own forward records the layers' arguments then. Tied heads (Gemma) included."""
    import test_families

    model = test_families.tiny(family)
    model.save_pretrained(tmp_path / family)
    ids = tokens(3, 32)
    assert stream_perplexity(tmp_path / family, ids, progress=False)["ppl"] == pytest.approx(
        perplexity(model, ids, progress=False)["ppl"], rel=1e-6)


def test_layers_pass_without_the_embedding_and_the_head(dense, tmp_path, monkeypatch):
    """Whenever a pass loads a decoder layer, the embedding and the head are on meta (at 7B they are
    1.6 GB each in fp32, beside a 0.8 GB layer)."""
    from vac.core.stream import Layers

    root, _ = dense
    seen = []
    real = Layers.load

    def load(self, i, *a):
        outer = [p for n, p in self.model.named_parameters() if not n.startswith(self.arch.layers + ".")]
        seen.append(all(p.device.type == "meta" for p in outer))
        return real(self, i, *a)

    monkeypatch.setattr(Layers, "load", load)
    stream_compress(root / "dense", None, CompressConfig.of(**BASE), tokens(8, 32), tmp_path / "out",
                    progress=False, stats_cache=False)
    stream_perplexity(tmp_path / "out", tokens(2, 32), progress=False)
    assert len(seen) >= 3 * 4 and all(seen)  # Fisher forward, backward, factorization, perplexity


def test_bf16_source_gives_a_bf16_checkpoint(tmp_path):
    model = tiny_llama(layers=2).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "dense")
    stream_compress(tmp_path / "dense", None, CompressConfig.of(**BASE), tokens(8, 32), tmp_path / "out",
                    progress=False)
    weights = folder_weights(tmp_path / "out")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded, _ = vac.load(str(tmp_path / "out"), dtype=torch.bfloat16)
    assert torch.isfinite(loaded(tokens(1, 16)).logits.float()).all()


PEAK = """
import sys, torch
from vac.core.rss import peak_rss_bytes
sys.path.insert(0, {tests!r})
from conftest import tokens
from vac.config import CompressConfig
from vac.core.stream import stream_compress
torch.set_num_threads(1)
cfg = CompressConfig.of(ratio=1.8, rank_step=64, rank_floor=64, fisher_windows=2, calib_windows=4, seq_len=64,
                        batch_size=4, refine_steps=4)  # the refinement's buffers do not depend on its steps
stream_compress(sys.argv[1], None, cfg, tokens(4, 64), sys.argv[2], progress=False, stats_cache=False)
print(peak_rss_bytes() // 1024)  # kB, as ru_maxrss
"""


@pytest.mark.slow  # builds wide models and compresses them in subprocesses (about half a minute)
def test_peak_memory_does_not_grow_with_the_number_of_layers(tmp_path):
    """Tiny but wide (each layer 28 MB of fp32 weights and 48 MB of fp64 statistics): holding the 4
    extra layers of a 6-layer model would add about 300 MB to the 2-layer peak; streamed, the 2- and
    8-layer peaks measured 701 and 713 MB alone (docs/scale.md); the bound is half of what holding the
    layers would cost. The peak is the subprocess's VmHWM (vac.core.rss): its ru_maxrss, read before, began at
    the pytest process's RSS at the exec, which put the two peaks up to 160 MB apart in the full suite."""
    from transformers import LlamaConfig, LlamaForCausalLM

    peaks = {}
    for layers in (2, 6):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=128, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                             num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=128)
        LlamaForCausalLM(config).save_pretrained(tmp_path / f"wide{layers}")
        run = subprocess.run([sys.executable, "-c", PEAK.format(tests=str(Path(__file__).parent)),
                              str(tmp_path / f"wide{layers}"), str(tmp_path / f"out{layers}")],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[layers] = int(run.stdout.split()[-1]) / 1024  # MB
    held = 4 * (28 + 48)  # MB the in-memory path would add
    assert peaks[6] - peaks[2] < held / 2, peaks


RANK = """
import json, sys, torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from conftest import tokens
from vac.config import CompressConfig
from vac.core.stream import stream_compress
torch.set_num_threads(1)
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method={store!r}, rank=rank, world_size=2)
result = stream_compress({source!r}, None, CompressConfig.of(**{settings!r}), tokens(8, 32), {out!r},
                         progress=False, stats_cache=False)
print(json.dumps(result.ranks))
"""


@pytest.mark.parametrize("settings", [dict(method="vac", refine="none"), dict(method="whiten", allocation="global"),
                                      dict(method="vac")], ids=["vac-fisher-sequential", "whiten-curves", "vac-refined"])
def test_two_gloo_ranks_equal_one_process(dense, tmp_path, settings):
    """Two processes (each half of the windows, statistics all-reduced, matrices shared out) give the
    ranks of one process and its factors within fp tolerance; rank 0 alone writes the checkpoint.
    With the refinement, each Adam step averages one batch per rank, so its steps are not one
    process's steps: the ranks agree and the model's loss is close to one process's."""
    root, _ = dense
    settings = {**BASE, **settings}
    one = stream_compress(root / "dense", None, CompressConfig.of(**settings), tokens(8, 32), tmp_path / "one",
                          progress=False, stats_cache=False)
    script = RANK.format(tests=str(Path(__file__).parent), store=f"file://{tmp_path / 'store'}",
                         source=str(root / "dense"), settings=settings, out=str(tmp_path / "two"))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert [json.loads(o.split("\n")[-2]) for o, _ in outs] == [one.ranks, one.ranks]
    expected, got = folder_weights(tmp_path / "one"), folder_weights(tmp_path / "two")
    assert expected.keys() == got.keys()
    if CompressConfig.of(**settings).resolved().strategy.refine != "none":
        ppl = [stream_perplexity(tmp_path / d, tokens(4, 32, seed=3), progress=False)["ppl"] for d in ("one", "two")]
        assert ppl[1] == pytest.approx(ppl[0], rel=2e-3) and ppl[1] != ppl[0], ppl
        return
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("settings", [dict(method="vac"), dict(method="whiten", allocation="global", sequential=False)],
                         ids=["fisher-sequential", "curves-dense"])
def test_offloaded_hidden_states_give_the_same_checkpoint(dense, tmp_path, settings, monkeypatch):
    """--offload-dir: every boundary goes through files (checked: the passes wrote some), the
    checkpoint is bit-identical, and nothing is left in the folder."""
    import vac.core.offload as offload

    root, _ = dense
    cfg = CompressConfig.of(**BASE, **settings)
    stream_compress(root / "dense", None, cfg, tokens(8, 32), tmp_path / "mem", progress=False, stats_cache=False)
    written = []
    real = offload.Spilled.__init__
    monkeypatch.setattr(offload.Spilled, "__init__", lambda self, *a: (real(self, *a), written.append(self.n))[0])
    stream_compress(root / "dense", None, cfg, tokens(8, 32), tmp_path / "disk", progress=False, stats_cache=False,
                    offload_dir=tmp_path / "spill")
    assert len(written) > len(dense[1].model.layers) and sum(written) > 0
    expected, got = folder_weights(tmp_path / "mem"), folder_weights(tmp_path / "disk")
    assert expected.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    assert list((tmp_path / "spill").iterdir()) == []


def test_a_hub_id_streams_from_its_snapshot(dense, tmp_path, monkeypatch):
    """A hub id is downloaded (snapshot_download: here a stand-in returning a local folder) and then
    compressed layer by layer like a local folder; a failed download is one line."""
    import huggingface_hub
    from conftest import tiny_tokenizer

    from vac.config import EvalConfig
    from vac.core.run import compress_model
    from vac.errors import VacError

    root, _ = dense
    snapshot = tmp_path / "snapshot"
    shutil.copytree(root / "dense", snapshot)
    tiny_tokenizer().save_pretrained(snapshot)
    (tmp_path / "calib.txt").write_text(word_text(3000, seed=1))
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append(repo) or str(snapshot))
    cfg = CompressConfig.of(**{**BASE, "calib": str(tmp_path / "calib.txt")})
    report = compress_model("someone/tiny-llama", tmp_path / "out", cfg, evaluation=EvalConfig("", 4), progress=False)
    assert asked == ["someone/tiny-llama"] and report["streamed"] is True and (tmp_path / "out" / "config.json").is_file()

    def offline(repo, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(VacError, match="cannot download hub model 'someone/other': We couldn't connect"):
        compress_model("someone/other", tmp_path / "out2", cfg, evaluation=EvalConfig("", 4), progress=False)
