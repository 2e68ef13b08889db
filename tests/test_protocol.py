"""Evaluation text is only for reporting: the split names each benchmark and default uses, asserted.

Scripts that choose a default or a hyperparameter (``DECIDING``) name no evaluation split and none
of the reporting constants; they pass every text they score through ``for_decisions``, which refuses
an evaluation split at run time too. The other benchmarks read evaluation splits only to report."""

import ast
from pathlib import Path

import pytest
import torch

from vac.config import DECISION_TEXTS, DEFAULT_CALIB, DEFAULT_EVAL, DEFAULT_SEARCH, REPORT_EVALS, DataConfig
from vac.data.specs import for_decisions
from vac.errors import VacError
from vac.search.space import SearchSetup

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
DECIDING = {"allocation_probe.py", "strategy_probe.py", "order_proxy.py", "short_proxy.py", "recovery_probe.py"}
REPORTING_NAMES = {"DEFAULT_EVAL", "REPORT_EVALS", "EvalConfig"}
# every corpus split named literally in each benchmark (reporting scripts may name eval splits)
SPLITS_NAMED = {
    "allocation_probe.py": set(),
    "order_proxy.py": set(), "short_proxy.py": set(),
    "strategy_probe.py": {"handbook:calib", "web-bible:calib+shakespeare:calib", "handbook:calib+{self}",
                          "web-bible:calib+shakespeare:calib+handbook:calib+{self}"},
    "decode_probe.py": set(), "distill_memory.py": set(), "gpu_check.py": set(), "quality.py": set(), "scale.py": set(), "search.py": set(),
    "onnx_profile.py": set(), "onnx_quality.py": set(),
    "recovery.py": set(), "recovery_probe.py": set(),
}


def strings_and_names(path: Path) -> tuple[set[str], set[str]]:
    tree = ast.parse(path.read_text())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    return strings, names


def split_literals(strings: set[str]) -> set[str]:
    return {s for s in strings if any(f":{split}" in s for split in ("calib", "search", "eval"))
            and " " not in s and s.split(":")[0] in ("austen", "handbook", "gnu", "web-bible", "shakespeare")}


def test_every_benchmark_is_listed():
    assert {p.name for p in BENCHMARKS.glob("*.py")} == set(SPLITS_NAMED)


@pytest.mark.parametrize("script", sorted(SPLITS_NAMED))
def test_split_names_of_each_benchmark(script):
    strings, names = strings_and_names(BENCHMARKS / script)
    assert split_literals(strings) == SPLITS_NAMED[script]
    if script in DECIDING:
        assert not any(":eval" in s for s in strings), script
        assert not names & REPORTING_NAMES, names & REPORTING_NAMES
        assert names & {"for_decisions", "Decision"}  # vac.search.decide scores through for_decisions


def test_defaults_decide_on_calibration_and_search_splits_only():
    for spec in (DEFAULT_CALIB, DEFAULT_SEARCH, DataConfig().calib, SearchSetup().calib, SearchSetup().search_data,
                 *DECISION_TEXTS):
        assert for_decisions(spec) == spec
    assert DEFAULT_EVAL in REPORT_EVALS and all(spec.endswith(":eval") for spec in REPORT_EVALS)


def test_for_decisions_refuses_evaluation_text(tmp_path):
    for spec in ("austen:eval", "austen", "handbook:calib+gnu:eval"):
        with pytest.raises(VacError, match="holds an evaluation split; decisions are made on"):
            for_decisions(spec)
    (tmp_path / "mine.txt").write_text("my own text")
    assert for_decisions(str(tmp_path / "mine.txt")) == str(tmp_path / "mine.txt")


def test_a_calibration_mix_takes_an_equal_share_of_each_part(tmp_path):
    """'big+small': as many windows from the small text as from the big one, shuffled, deterministic."""
    from conftest import tiny_tokenizer

    from vac.data.windows import sample_windows

    (tmp_path / "big.txt").write_text(" ".join(f"w{i % 50 + 2}" for i in range(20000)))
    (tmp_path / "small.txt").write_text(" ".join(f"w{i % 40 + 60}" for i in range(800)))
    spec = f"{tmp_path / 'big.txt'}+{tmp_path / 'small.txt'}"
    tok = tiny_tokenizer()
    windows = sample_windows(tok, spec, 16, 7, seed=0)
    small = [bool((w >= tok.convert_tokens_to_ids("w60")).all()) for w in windows]
    assert sum(small) == 3 and len(windows) == 7  # 7 = 4 + 3: the first part takes the extra one
    assert torch.equal(windows, sample_windows(tok, spec, 16, 7, seed=0))
    assert small[:4] != [False] * 4  # shuffled: the Fisher pass's first windows see both parts
    with pytest.raises(VacError, match="cannot take a share of each of the 2 parts"):
        sample_windows(tok, spec, 16, 1)
