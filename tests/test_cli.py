"""The command line as a user runs it: results, reports, and one-line errors for bad input."""

import json

import pytest
import torch
from conftest import folder_weights, tiny_llama
from typer.testing import CliRunner

from vac.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def error_line(err: str) -> str:
    """The single 'error: ...' line of stderr (progress bars may precede it); no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def compress_args(tmp_path, folder, out, *extra):
    return ["compress", folder, "--out", out, "--calib", tmp_path / "calib.txt", "--eval",
            tmp_path / "eval.txt", "--seq-len", 32, "--calib-windows", 8, "--fisher-windows", 4,
            "--eval-windows", 4, "--rank-step", 4, "--rank-floor", 4, *extra]


def test_eval_json(tiny_folder, tmp_path):
    code, out, _ = run("eval", tiny_folder, "--data", tmp_path / "eval.txt", "--seq-len", 32,
                       "--windows", 5, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["tokens"] == 5 * 31 and result["seq_len"] == 32
    assert result["data"] == str(tmp_path / "eval.txt")
    assert 1 < result["ppl"] < 1000  # random tiny model over 128 tokens: about the vocabulary size


@pytest.mark.parametrize("method", ["vac", "whiten", "svd"])
def test_compress_writes_a_loadable_checkpoint_and_report(tiny_folder, tmp_path, method):
    from vac import checkpoint

    out = tmp_path / f"out-{method}"
    code, stdout, stderr = run(*compress_args(tmp_path, tiny_folder, out, "--ratio", 1.5, "--method", method))
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["ratio_reached"] >= 1.5 * 0.999
    assert report["config"]["method"] == method
    assert report["ppl_before"]["ppl"] > 1 and report["ppl_after"]["ppl"] > 1
    assert report["decoder_linear_params"]["after"] < report["decoder_linear_params"]["before"]
    assert (out / "ranks.png").read_bytes()[:4] == b"\x89PNG"
    model, tok = checkpoint.load(out)
    assert checkpoint.rank_map(model) == report["ranks"]
    assert tok is not None
    assert "ratio reached" in stdout


def test_compress_reuses_cached_statistics(tiny_folder, tmp_path):
    outs = [tmp_path / f"out{i}" for i in range(3)]
    codes, errs = [], []
    for out, extra in zip(outs, ([], [], ["--no-stats-cache"])):
        code, _, err = run(*compress_args(tmp_path, tiny_folder, out, "--ratio", 1.5, *extra))
        codes.append(code)
        errs.append(err)
    assert codes == [0, 0, 0], errs
    assert ["dense statistics from" in e for e in errs] == [False, True, False]
    first, cached, fresh = (folder_weights(out) for out in outs)
    assert first.keys() == cached.keys() == fresh.keys()
    assert all(torch.equal(first[k], cached[k]) and torch.equal(first[k], fresh[k]) for k in first)


def test_compress_refuses_existing_output_then_overwrites(tiny_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(*compress_args(tmp_path, tiny_folder, out, "--method", "svd"))
    assert code == 2 and "already exists" in error_line(err)
    code, _, err = run(*compress_args(tmp_path, tiny_folder, out, "--method", "svd", "--overwrite"))
    assert code == 0, err
    assert (out / "report.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ratio", "1"], "greater than 1"),
        (["--ratio", "0.5"], "greater than 1"),
        (["--ratio", "40", "--method", "svd"], "too large"),
        (["--method", "nope"], "unknown method"),
        (["--order", "sideways"], "unknown order"),
        (["--calib-windows", "100000"], "too little calibration data"),
    ],
)
def test_compress_bad_input_is_one_line_and_writes_nothing(tiny_folder, tmp_path, args, message):
    out = tmp_path / "out"
    code, _, err = run(*compress_args(tmp_path, tiny_folder, out, *args))
    assert code == 2
    assert message in error_line(err)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_model_and_data_inputs(tiny_folder, tmp_path):
    code, _, err = run("eval", tmp_path / "nowhere", "--data", tmp_path / "eval.txt")
    assert code == 2 and "no such model folder" in error_line(err)
    (tmp_path / "empty.txt").write_text("  \n ")
    code, _, err = run("eval", tiny_folder, "--data", tmp_path / "empty.txt", "--seq-len", 32)
    assert code == 2 and "empty.txt" in error_line(err)
    code, _, err = run("eval", tiny_folder, "--data", "austen:nosuchsplit")
    assert code == 2 and "split" in error_line(err)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")
    code, _, err = run("eval", broken, "--data", tmp_path / "eval.txt")
    assert code == 2 and "cannot load checkpoint" in error_line(err)


def test_unsupported_architecture(tmp_path):
    from conftest import tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    code, _, err = run("eval", folder, "--data", "austen:eval")
    line = error_line(err)
    assert code == 2 and "unsupported architecture 'gpt2'" in line and "llama" in line


def test_tiny_llama_fixture_is_deterministic():
    a, b = tiny_llama(seed=3), tiny_llama(seed=3)
    assert all((p - q).abs().max() == 0 for p, q in zip(a.parameters(), b.parameters()))
