"""Never lose the user's data, never a traceback: bad invocations, overlapping outputs, caches that
cannot be trusted, permissions, Ctrl-C, and kill -9 then the same command again."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import folder_weights, tiny_llama, tiny_tokenizer, word_text
from typer.testing import CliRunner

from vac.cli import app

runner = CliRunner()
SMALL = ["--seq-len", "32", "--calib-windows", "8", "--fisher-windows", "4", "--rank-step", "4", "--rank-floor", "4"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny dense model, its compressed checkpoint, and text files: everything the commands read."""
    root = tmp_path_factory.mktemp("inputs")
    tiny_llama(layers=2).save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    for name, seed, n in (("calib", 1, 3000), ("search", 3, 1500), ("eval", 2, 1500)):
        (root / f"{name}.txt").write_text(word_text(n, seed=seed))
    (root / "bad-strategy.json").write_text(json.dumps({"config": {"type_weights": {"q": "high"}}}))
    result = runner.invoke(app, ["compress", str(root / "tiny"), "--out", str(root / "ckpt"), "--calib",
                                 str(root / "calib.txt"), "--eval", "", *SMALL, "--ratio", "1.5"])
    assert result.exit_code == 0, result.output
    (root / "ckpt" / "README.md").write_text("# my own notes about this checkpoint\n")
    return root


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error(result) -> str:
    text = result.stderr if result.stderr else result.output
    assert "Traceback" not in text, text
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


# (arguments with {root}/{out} placeholders, a phrase of the one error line)
BAD = [
    (["compress", "{root}/tiny", "--ratio", "1"], "--ratio must be greater than 1"),
    (["compress", "{root}/tiny", "--ratio", "0.5"], "--ratio must be greater than 1"),
    (["compress", "{root}/tiny", "--rank-step", "0"], "--rank-step must be an integer of at least 1"),
    (["compress", "{root}/tiny", "--rank-floor", "0"], "--rank-floor must be"),
    (["compress", "{root}/tiny", "--fisher-windows", "0"], "--fisher-windows must be"),
    (["compress", "{root}/tiny", "--calib-windows", "0"], "--calib-windows must be"),
    (["compress", "{root}/tiny", "--seq-len", "1"], "--seq-len must be"),
    (["compress", "{root}/tiny", "--order", "1,,0"], "integers only"),
    (["compress", "{root}/tiny", "--order", "0,0"], "permutation of 0..1"),
    (["compress", "{root}/tiny", "--order", "sideways"], "unknown order"),
    (["compress", "{root}/tiny", "--order", "outward:5"], "start must be a layer of 0..1"),
    (["compress", "{root}/tiny", "--method", "lora"], "unknown method"),
    (["compress", "{root}/tiny", "--allocation", "greedy"], "unknown allocation"),
    (["compress", "{root}/tiny", "--attn-ratio", "1"], "--attn-ratio must be greater than 1"),
    (["compress", "{root}/tiny", "--correct", "--method", "svd"], "--correct needs"),
    (["compress", "{root}/tiny", "--dtype", "fp16"], "--dtype must be"),
    (["compress", "{root}/tiny", "--offload-dir", "{root}/calib.txt"], "is a file, not a folder"),
    (["compress", "{root}/tiny", "--offload-dir", "{root}/spill", "--in-memory"], "--offload-dir needs the streamed"),
    (["compress", "{root}/tiny", "--device", "tpu"], "--device must be"),
    (["compress", "{root}/tiny", "--eval-windows", "0"], "--eval-windows must be"),
    (["compress", "{root}/tiny", "--strategy", "{root}/missing.json"], "no such strategy file"),
    (["compress", "{root}/tiny", "--strategy", "{root}/bad-strategy.json"], "type_weights"),
    (["compress", "{root}/tiny", "--calib", "{root}/nothing.txt"], "unknown data source"),
    (["compress", "{root}/tiny", "--eval", "{root}/calib.txt"], "overlaps the evaluation data"),
    (["compress", "{root}/nowhere"], "no such model folder"),
    (["compress", "{root}/tiny", "--ratio", "40", "--method", "svd"], "too large"),
    (["compress", "{root}/tiny", "--calib-windows", "100000"], "too little calibration data"),
    (["search", "{root}/tiny", "--population", "1"], "--population must be at least 2"),
    (["search", "{root}/tiny", "--generations", "0"], "--generations must be at least 1"),
    (["search", "{root}/tiny", "--workers", "0"], "--workers must be at least 1"),
    (["search", "{root}/tiny", "--search-data", "{root}/eval.txt"], "overlaps the evaluation data"),
    (["search", "{root}/tiny", "--fisher-windows", "0"], "--fisher-windows must be"),
    (["search", "{root}/tiny", "--order-windows", "2", "--no-proxy"], "--order-windows needs the proxy search"),
    (["distill", "{root}/tiny-missing"], "no checkpoint folder"),
    (["distill", "{root}/ckpt", "--alpha", "2"], "--alpha must be in [0, 1]"),
    (["distill", "{root}/ckpt", "--steps", "0"], "--steps must be positive"),
    (["distill", "{root}/ckpt", "--data", "{root}/eval.txt"], "overlaps the evaluation data"),
    (["quantize", "{root}/ckpt", "--scheme", "int4"], "unknown int8 scheme"),
    (["quantize", "{root}/nowhere"], "no checkpoint folder"),
    (["eval", "{root}/tiny", "--data", "{root}/eval.txt", "--seq-len", "1"], "--seq-len must be at least 2"),
    (["eval", "{root}/tiny", "--data", "{root}/nothing.txt"], "unknown data source"),
    (["bench", "{root}/nowhere"], "is not a model folder"),
    (["chat", "{root}/ckpt", "-p", " "], "the prompt is empty"),
    (["card", "{root}/ckpt"], "is not a vac card"),  # the user's own README.md is never replaced
    (["card", "{root}/nowhere"], "no such checkpoint folder"),
]
NEEDS_DATA = {"compress": ["--calib", "{root}/calib.txt", "--eval", "{root}/eval.txt", "--eval-windows", "4"],
              "search": ["--calib", "{root}/calib.txt", "--eval", "{root}/eval.txt", "--search-data",
                         "{root}/search.txt", "--search-windows", "4", "--eval-windows", "4"],
              "distill": ["--data", "{root}/calib.txt", "--eval", "{root}/eval.txt", "--teacher", "{root}/tiny"]}
WRITES = ("compress", "search", "distill", "quantize")


def build(args: list[str], root: Path, out: Path) -> list[str]:
    command = args[0]
    given = set(args)
    extra = []
    defaults = NEEDS_DATA.get(command, [])
    for i in range(0, len(defaults), 2):  # the test's own data unless the case sets that option
        if defaults[i] not in given:
            extra += defaults[i: i + 2]
    if command in ("compress", "search"):
        extra += [a for i, a in enumerate(SMALL) if SMALL[i - (i % 2)] not in given]
    if command in WRITES:
        extra += ["--out", "{out}"]
    return [a.format(root=root, out=out) for a in args + extra]


def test_at_least_thirty_bad_invocations():
    assert len(BAD) >= 30 and {a[0] for a, _ in BAD} >= {"compress", "search", "distill", "quantize", "eval",
                                                          "bench", "chat"}


@pytest.mark.parametrize("args, phrase", BAD, ids=[f"{a[0]}:{' '.join(a[2:4])}" for a, _ in BAD])
def test_bad_invocation_is_one_line_and_writes_nothing(inputs, tmp_path, args, phrase):
    before = checksums(inputs)
    out = tmp_path / "out"
    result = runner.invoke(app, build(args, inputs, out))
    assert result.exit_code == 2, result.output
    assert phrase in " ".join(one_error(result).split())
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert checksums(inputs) == before  # the inputs are byte-identical


@pytest.mark.parametrize("command, target", [
    ("compress", "{root}/tiny"), ("compress", "{root}/tiny/inner"), ("compress", "{root}"),
    ("search", "{root}/tiny"), ("search", "{root}/calib.txt"),
    ("distill", "{root}/ckpt"), ("distill", "{root}/tiny"),
    ("quantize", "{root}/ckpt"), ("quantize", "{root}/ckpt/q8"),
])
def test_output_overlapping_an_input_is_refused(inputs, command, target):
    """The same folder as an input (an easy slip), inside it, or around it: refused, inputs untouched."""
    before = checksums(inputs)
    source = {"compress": "{root}/tiny", "search": "{root}/tiny", "distill": "{root}/ckpt", "quantize": "{root}/ckpt"}
    args = build([command, source[command]], inputs, Path("unused"))
    args[args.index("--out") + 1] = target.format(root=inputs)
    result = runner.invoke(app, args + ["--overwrite"] * (command in ("compress", "distill", "quantize")))
    assert result.exit_code == 2, result.output
    assert "overlaps the" in one_error(result)
    assert checksums(inputs) == before


def test_ctrl_c_is_one_line_and_exit_130(inputs, tmp_path, monkeypatch):
    import vac.core.run as run_module

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "compress_model", interrupted)
    result = runner.invoke(app, build(["compress", "{root}/tiny"], inputs, tmp_path / "out"))
    assert result.exit_code == 130 and "interrupted" in one_error(result)


def test_out_of_memory_names_the_options_that_lower_it(inputs, tmp_path, monkeypatch):
    import vac.core.run as run_module

    def oom(*_a, **_k):
        from vac.faults import stage

        stage("the factorization")
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(run_module, "compress_model", oom)
    result = runner.invoke(app, build(["compress", "{root}/tiny"], inputs, tmp_path / "out"))
    line = one_error(result)
    assert result.exit_code == 2 and "out of memory in vac compress during the factorization" in line
    assert "--calib-windows" in line


def test_a_killed_writers_temp_file_is_removed(tmp_path):
    from vac.atomic import write_json

    stale = tmp_path / ".state.json.999999999.tmp"
    stale.write_text("{half")
    write_json(tmp_path / "state.json", {"ok": 1})
    assert not stale.exists() and json.loads((tmp_path / "state.json").read_text()) == {"ok": 1}


def test_written_folders_have_ordinary_permissions_and_stale_temps_go(inputs, tmp_path):
    stale = tmp_path / ".out.tmp-999999999-abcd"  # a killed run's temp folder (no such process)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    old = os.umask(0o022)
    try:
        result = runner.invoke(app, build(["compress", "{root}/tiny", "--method", "svd"], inputs, tmp_path / "out"))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert not stale.exists()
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    for f in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# ----------------------------------------------------------------------------- caches


def vac_home(monkeypatch, path: Path) -> Path:
    monkeypatch.setenv("VAC_HOME", str(path))
    return path


def compress_once(inputs, out: Path, *extra):
    result = runner.invoke(app, build(["compress", "{root}/tiny", *extra], inputs, out))
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("cache", ["stats", "ppl", "tokens"])
def test_corrupt_cache_entry_is_reported_and_recomputed(inputs, tmp_path, monkeypatch, cache):
    home = vac_home(monkeypatch, tmp_path / "home")
    compress_once(inputs, tmp_path / "a")
    entries = sorted((home / cache).iterdir())
    assert entries
    for entry in entries:
        entry.write_bytes(b"\x00 not a cache entry")
    again = compress_once(inputs, tmp_path / "b")
    warnings = [ln for ln in again.stderr.splitlines() if ln.startswith("warning: ignoring unreadable cache entry")]
    assert len(warnings) >= len(entries)
    a, b = folder_weights(tmp_path / "a"), folder_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = [json.loads((tmp_path / d / "report.json").read_text()) for d in "ab"]
    assert report[0]["ppl_after"] == report[1]["ppl_after"]


def test_corrupt_teacher_cache_entry_is_recomputed(tmp_path):
    from vac.recover.distill import TopKCache

    teacher = tiny_llama(seed=3)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    cache = TopKCache(tmp_path / "tc", 8, "t", lambda: teacher)
    values, indices = cache.get(ids, mask, "cpu")
    for p in (tmp_path / "tc").rglob("*.pt"):
        p.write_bytes(b"garbage")
    again = TopKCache(tmp_path / "tc", 8, "t", lambda: teacher)
    v2, i2 = again.get(ids, mask, "cpu")
    assert again.misses == 2 and torch.equal(values, v2) and torch.equal(indices, i2)


# ----------------------------------------------------------------------------- kill -9 and resume


def cli(args: list[str], home: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VAC_KILL_AT"}
    env |= {"VAC_HOME": str(home), "OMP_NUM_THREADS": "1"}
    if kill_at:
        env["VAC_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "vac.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(name, args)``: the folder of one uninterrupted run of ``args(out)``, run once per
    command for all the kill points of its test."""
    done: dict[str, Path] = {}

    def run(name: str, args) -> Path:
        if name not in done:
            root = tmp_path_factory.mktemp(f"ref-{name}")
            ref = cli(args(root / "ref"), root / "home")
            assert ref.returncode == 0, ref.stderr[-2000:]
            done[name] = root / "ref"
        return done[name]

    return run


def same_weights(a: Path, b: Path) -> None:
    wa, wb = folder_weights(a), folder_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # six Python processes that import torch
@pytest.mark.parametrize("point", ["statistics", "sequential:2", "save"])
def test_compress_killed_then_rerun_equals_an_uninterrupted_run(inputs, reference, tmp_path, point):
    args = lambda out: build(["compress", "{root}/tiny"], inputs, out)  # noqa: E731
    ref = reference("compress", args)
    home = tmp_path / "home"
    killed = cli(args(tmp_path / "out"), home, kill_at=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing half-written in place
    again = cli(args(tmp_path / "out"), home)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not list(tmp_path.glob(".out.*"))  # the killed run's temp folder was removed
    same_weights(ref, tmp_path / "out")
    ppl = [json.loads((d / "report.json").read_text())["ppl_after"]["ppl"] for d in (ref, tmp_path / "out")]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["statistics", "search-generation:1", "search-generation:2"])
def test_search_killed_then_rerun_equals_an_uninterrupted_run(inputs, reference, tmp_path, point):
    args = lambda out: build(["search", "{root}/tiny", "--ratio", "1.5", "--population", "3",  # noqa: E731
                              "--generations", "2", "--top-k", "1", "--order-windows", "4",
                              "--order-seq-len", "32"], inputs, out)
    ref = reference("search", args)
    home = tmp_path / "home"
    killed = cli(args(tmp_path / "out"), home, kill_at=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = cli(args(tmp_path / "out"), home)
    assert again.returncode == 0, again.stderr[-2000:]
    strip = lambda d: {k: v for k, v in d.items() if k not in ("minutes", "reproduce")}  # noqa: E731
    summary = [strip(json.loads((d / "search.json").read_text())) for d in (ref, tmp_path / "out")]
    for s in summary:
        s["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in s["history"]]
        s["orders"] = [{k: v for k, v in o.items() if k != "seconds"} for o in s["orders"]]
    assert summary[0] == summary[1]
    strategy = [json.loads((d / "strategy.json").read_text())["config"] for d in (ref, tmp_path / "out")]
    assert strategy[0] == strategy[1]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["distill-state:1", "distill-state:2", "save:3"])
def test_distill_killed_then_rerun_equals_an_uninterrupted_run(inputs, reference, tmp_path, point):
    args = lambda out: build(["distill", "{root}/ckpt", "--steps", "6", "--save-every", "2",  # noqa: E731
                              "--seq-len", "32", "--batch-size", "2", "--chat-fraction", "0",
                              "--eval-seq-len", "32", "--eval-windows", "2", "--device", "cpu"], inputs, out)
    ref = reference("distill", args)
    home = tmp_path / "home"
    killed = cli(args(tmp_path / "out"), home, kill_at=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = cli(args(tmp_path / "out"), home)
    assert again.returncode == 0, again.stderr[-2000:]
    same_weights(ref, tmp_path / "out")
    report = [json.loads((d / "distill.json").read_text()) for d in (ref, tmp_path / "out")]
    assert report[0]["ppl_after"]["ppl"] == pytest.approx(report[1]["ppl_after"]["ppl"], rel=1e-5)


def test_out_of_memory_in_a_streamed_stage_says_how_much_it_needs(inputs, tmp_path, monkeypatch):
    """A real streamed compress running out of memory in its factorization: the line names the bytes
    the stage needs (vac.core.memory) at these settings."""
    import vac.core.stream as stream_module
    from vac.core.memory import Shapes, human, stage_bytes
    from vac.models.families import arch_for

    def oom(*_a, **_k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    allocated = []

    def assign_ranks(*args):
        allocated.append(real_assign(*args))
        return allocated[-1]

    real_assign = stream_module.assign_ranks
    monkeypatch.setattr(stream_module, "decompose", oom)
    monkeypatch.setattr(stream_module, "assign_ranks", assign_ranks)
    result = runner.invoke(app, build(["compress", "{root}/tiny"], inputs, tmp_path / "out"))
    line = one_error(result)
    model, reader = stream_module.skeleton(inputs / "tiny", "meta")
    arch = arch_for(model)
    shapes = Shapes.of(model.config, arch, lambda name: reader.shape(f"{name}.weight"))
    assert shapes.linears["mlp.down_proj"] == (model.config.hidden_size, model.config.intermediate_size)
    # the factorization's figure counts the largest layer as the rank map compresses it (0: kept dense)
    sizes = [sum(r * (o + i) if (r := allocated[0][f"{arch.layer_path(k)}.{name}"]) else o * i
                 for name, (o, i) in shapes.linears.items()) for k in range(model.config.num_hidden_layers)]
    assert max(sizes) < shapes.layer_params() - shapes.other_params  # some matrix was factorized
    needs = stage_bytes(shapes, windows=8, seq_len=32, fisher_windows=4, batch_size=8, refine="dense",
                        largest_layer=max(sizes))["the factorization"]  # vac's default refinement
    assert needs < stage_bytes(shapes, windows=8, seq_len=32, fisher_windows=4, batch_size=8,
                               refine="dense")["the factorization"]  # below the bound taken before allocation
    assert result.exit_code == 2 and f"during the factorization, which needs about {human(needs)}" in line, line
    assert not (tmp_path / "out").exists()
