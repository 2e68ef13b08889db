"""``vac search --streamed``: the same proxy scores and full scores as the in-memory search, with
statistics and factors per layer on disk, resumable, and peak memory that does not grow with depth."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import test_search
import torch
from conftest import tiny_tokenizer, word_text
from typer.testing import CliRunner

import vac.cli.search  # noqa: F401  (registers the command)
from vac.cli import app
from vac.data.windows import eval_windows, sample_windows
from vac.errors import VacError
from vac.search.run import run_search
from vac.search.scoring import InMemoryEngine
from vac.search.space import Genome
from vac.search.streamed import StreamedEngine, StreamedScorer

runner = CliRunner()
QUIET = dict(progress=False, log=lambda _m: None)
# the in-memory search tests' tiny model, texts, setup and one-thread fixture, shared
files, one_thread, setup_for = test_search.files, test_search.one_thread, test_search.setup_for


def engines(files, tmp_path, **kw):
    out = []
    for streamed in (False, True):
        setup = setup_for(files, streamed=streamed, **kw)
        engine = (StreamedEngine if streamed else InMemoryEngine)(setup, tmp_path / f"cache-{streamed}", progress=False)
        tok = engine.tokenizer
        calib = sample_windows(tok, setup.calib, setup.seq_len, setup.calib_windows, seed=0)
        engine.prepare(calib, eval_windows(tok, setup.search_data, setup.seq_len, setup.search_windows))
        out.append(engine)
    return out


GENOMES = [
    Genome.default(4),
    Genome((0, 1, 2, 3), "vac", 0.5, 0.5, "global", (0.0, 1.0, 0.0, -0.5, 0.0, 0.0, 0.5)),
    Genome((0, 1, 2, 3), "whiten", 2 / 3, 1.5, "uniform", (0.0,) * 7),
    Genome((0, 1, 2, 3), "vac", 0.25, 1.0, "global", (0.0,) * 7),
]


def test_streamed_proxy_scores_equal_the_in_memory_ones(files, tmp_path):
    memory, streamed = engines(files, tmp_path)
    ours = streamed.proxy(GENOMES)  # one pass over the layers for the whole list
    theirs = memory.proxy(GENOMES)
    for a, b in zip(ours, theirs):
        assert a["params_after"] == b["params_after"] and a["ratio_reached"] == pytest.approx(b["ratio_reached"])
        assert a["score"] == pytest.approx(b["score"], rel=1e-4)
    assert len({round(r["score"], 3) for r in ours}) == len(GENOMES)  # the genomes differ, and so do their scores
    # every matrix's spectrum is the in-memory cache's; the sets live per layer on disk
    for method, exponent in {(g.method, g.exponent) for g in GENOMES}:
        mine, ref = streamed.factors.spectra(method, exponent), memory.factors.spectra(method, exponent)
        assert mine.keys() == ref.keys()
        assert all(torch.allclose(mine[p], ref[p], rtol=1e-4, atol=1e-6) for p in ref)
    files_on_disk = sorted(p.name for p in (tmp_path / "cache-True" / "stream" / "inputs").iterdir())
    assert files_on_disk == [f"layer-{i:05d}.pt" for i in range(4)]
    # the layers are on meta between passes: the skeleton holds embeddings, norm and head only
    assert all(p.device.type == "meta" for n, p in streamed.model.named_parameters() if ".layers." in n)
    svds = streamed.factors.svds
    again = streamed.proxy(GENOMES[:2])  # a genome's score does not depend on its company
    assert [r["score"] for r in again] == [r["score"] for r in ours[:2]]
    assert streamed.factors.svds == svds  # and needs no new SVD (factors truncated from disk)


def test_scoring_several_genomes_reads_each_layer_once(files, tmp_path, monkeypatch):
    _, streamed = engines(files, tmp_path)
    streamed.proxy(GENOMES)  # the factor sets exist
    loads = []
    real = streamed.layers.load
    monkeypatch.setattr(streamed.layers, "load", lambda i, *a: loads.append(i) or real(i, *a))
    StreamedScorer.score_many(streamed.scorer, GENOMES)
    assert loads == [0, 1, 2, 3]


def test_streamed_search_equals_the_in_memory_search(files, tmp_path):
    """The default's full score (streamed compress + streamed perplexity) equals the in-memory one, and
    the streamed search runs to the end, its orders scored (the same order scores as in memory)."""
    memory = run_search(setup_for(files, seed=3), tmp_path / "m", generations=1, **QUIET)
    streamed = run_search(setup_for(files, seed=3, streamed=True), tmp_path / "s", generations=2, **QUIET)
    assert streamed["default"]["search_ppl"] == pytest.approx(memory["default"]["search_ppl"], rel=1e-4)
    assert streamed["default"]["eval_ppl"] == pytest.approx(memory["default"]["eval_ppl"], rel=1e-4)
    assert streamed["winner"]["search_ppl"] <= streamed["default"]["search_ppl"]
    assert not list((tmp_path / "s" / "cache" / "full").glob("*"))  # re-scored checkpoints removed at the end
    assert not list((tmp_path / "s" / "cache" / "orders").glob("*"))  # and each order score's at once
    assert {"strategy.json", "search.json", "fitness.png"} <= {p.name for p in (tmp_path / "s").iterdir()}
    orders = [json.loads((tmp_path / d / "state.json").read_text())["short"] for d in ("m", "s")]
    assert len(orders[1]) >= 2  # the default's and at least one other order were scored
    for key in orders[0].keys() & orders[1].keys():
        assert orders[1][key]["score"] == pytest.approx(orders[0][key]["score"], rel=1e-4), key


def test_streamed_short_score_equals_the_in_memory_one(files, tmp_path):
    memory, streamed = engines(files, tmp_path)
    setup = memory.setup
    calib = setup.order_calibration(memory.tokenizer)
    middle = replace(Genome.default(4), order=(2, 3, 1, 0))
    other = replace(middle, exponent=1.0, attn=1.0)  # the short proxy scores every gene
    genomes = (Genome.default(4), middle, other)
    scores = [e.short_score(g, calib)["score"] for g in genomes for e in (memory, streamed)]
    for i in (0, 2, 4):  # the same short windows and the same dense statistics (the full run's)
        assert scores[i + 1] == pytest.approx(scores[i], rel=1e-4), i
    assert scores[0] != pytest.approx(scores[2], rel=1e-3)  # the order changes the score
    assert scores[2] != pytest.approx(scores[4], rel=1e-3)  # so do the other genes


def test_streamed_search_resumes_after_a_kill(files, tmp_path, monkeypatch):
    setup = setup_for(files, seed=5, streamed=True)
    straight = run_search(setup, tmp_path / "a", generations=2, **QUIET)
    calls = {"n": 0}
    real = StreamedScorer.score_many

    def dying(self, genomes, progress=False):  # killed while scoring the second generation
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, genomes, progress)

    monkeypatch.setattr(StreamedScorer, "score_many", dying)
    with pytest.raises(KeyboardInterrupt):
        run_search(setup, tmp_path / "b", generations=2, **QUIET)
    monkeypatch.setattr(StreamedScorer, "score_many", real)
    resumed = run_search(setup, tmp_path / "b", generations=2, **QUIET)
    drop = lambda d: {k: v for k, v in d.items() if k not in ("reproduce", "history")}  # noqa: E731
    assert test_search.strip(drop(resumed)) == test_search.strip(drop(straight))
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["setup"]["streamed"] is True


def test_memory_plan_of_the_streamed_search(files, tmp_path):
    """The plan's terms follow the code: each extra genome of a generation holds its search windows'
    hidden states at one boundary; the full re-scores are streamed compressions of the same calibration."""
    from dataclasses import replace

    from vac.core.memory import Shapes, stage_bytes

    _, streamed = engines(files, tmp_path)
    needs = streamed.needs
    streamed.setup = replace(streamed.setup, population=7)
    bigger = streamed.plan(streamed.calib, streamed.windows)
    hidden = streamed.model.config.hidden_size
    assert bigger["the proxy scores"] - needs["the proxy scores"] == 3 * 4 * 32 * hidden * 4  # 3 genomes × 4 windows
    assert {k: v for k, v in bigger.items() if k != "the proxy scores"} == \
        {k: v for k, v in needs.items() if k != "the proxy scores"}
    reader = streamed.layers.reader
    shapes = Shapes.of(streamed.model.config, streamed.layers.arch, lambda n: reader.shape(f"{n}.weight"))
    # the re-scores run in any order the search reaches: of 4 layers, an outward order holds 4 boundaries
    # of a stream at once (front to back 2)
    compress = stage_bytes(shapes, windows=8, seq_len=32, fisher_windows=4, batch_size=8, refine="dense", held=4)
    assert needs["the full re-scores"] == max(compress.values())
    assert needs["the Fisher pass"] == compress["the Fisher pass"]


def test_streamed_search_refuses_what_it_cannot_serve(files, tmp_path):
    with pytest.raises(VacError, match="--workers needs the in-memory search"):
        run_search(setup_for(files, streamed=True), tmp_path / "w", generations=1, workers=2, **QUIET)
    run = runner.invoke(app, ["search", str(files / "tiny"), "--out", str(tmp_path / "x"), "--streamed",
                              "--ablation", "--calib", str(files / "calib.txt")])
    assert run.exit_code == 2 and "--ablation" in run.output and not (tmp_path / "x").exists()


PEAK = """
import sys, torch
from vac.core.rss import peak_rss_bytes
sys.path.insert(0, {tests!r})
from vac.data.windows import eval_windows, sample_windows
from vac.search.space import Genome, SearchSetup
from vac.search.streamed import StreamedEngine
torch.set_num_threads(1)
root = sys.argv[1]
setup = SearchSetup(model=sys.argv[2], ratio=1.8, population=3, calib=root + "/calib.txt", search_data=root + "/search.txt",
                    eval_data="", calib_windows=4, fisher_windows=2, seq_len=64, search_windows=2, rank_step=64,
                    rank_floor=64, streamed=True)
engine = StreamedEngine(setup, sys.argv[3], progress=False)
tok = engine.tokenizer
engine.prepare(sample_windows(tok, setup.calib, 64, 4, seed=0), eval_windows(tok, setup.search_data, 64, 2))
n = engine.factors.n
engine.proxy([Genome.default(n), Genome(tuple(range(n)), "vac", 2 / 3, 1.0, "uniform", (0.0,) * 7)])
print(peak_rss_bytes() // 1024)  # kB, as ru_maxrss
"""


@pytest.mark.slow  # builds wide models and runs the search's streamed stages in subprocesses
def test_streamed_search_peak_does_not_grow_with_the_number_of_layers(tmp_path):
    """Tiny but wide (each layer 28 MB of fp32 weights, 48 MB of fp64 statistics, 28 MB per factor set):
    the search's own stages (Fisher pass, input statistics, a factor set, a generation's proxy scores;
    its full re-scores are streamed compressions, bounded in tests/test_stream.py) at 6 layers peak
    within half of what holding the 4 extra layers' weights, statistics and factors would add."""
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, seed in (("calib", 1), ("search", 3)):
        (tmp_path / f"{name}.txt").write_text(word_text(4000, seed=seed))
    peaks = {}
    for layers in (2, 6):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=tiny_tokenizer().vocab_size, hidden_size=768, intermediate_size=2048,
                             num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=12,
                             max_position_embeddings=128)
        LlamaForCausalLM(config).save_pretrained(tmp_path / f"wide{layers}")
        tiny_tokenizer().save_pretrained(tmp_path / f"wide{layers}")
        run = subprocess.run([sys.executable, "-c", PEAK.format(tests=str(Path(__file__).parent)), str(tmp_path),
                              str(tmp_path / f"wide{layers}"), str(tmp_path / f"cache{layers}")],
                             capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[layers] = int(run.stdout.split()[-1]) / 1024  # MB
        assert len(list((tmp_path / f"cache{layers}" / "stream" / "inputs").iterdir())) == layers
    held = 4 * (28 + 48 + 28)  # MB the in-memory search would add
    assert peaks[6] - peaks[2] < held / 2, peaks
