"""The public API: the README's Python snippet runs as written, and each entry point is reachable."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import vac

README = Path(__file__).parents[1] / "README.md"


def readme_snippet() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), scope)  # its own asserts check the logits
    result, out = scope["result"], Path(scope["out"])
    assert 1.5 <= result.ratio < 1.6 and (out / "config.json").is_file()


def test_readme_checkpoint_loads_in_a_process_without_vac(tmp_path):
    scope: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), scope)
    import torch

    torch.save(scope["calibration"][:2], tmp_path / "ids.pt")
    probe = ("import sys, torch, transformers; sys.modules['vac'] = None; "
             "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval(); "
             "torch.save(m(torch.load(sys.argv[2])).logits.detach(), sys.argv[2] + '.out'); print(type(m).__name__)")
    done = subprocess.run([sys.executable, "-c", probe, str(scope["out"]), str(tmp_path / "ids.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "VacLlamaForCausalLM"
    torch.testing.assert_close(torch.load(tmp_path / "ids.pt.out"), scope["ours"], atol=1e-5, rtol=1e-5)


def test_entry_points_are_public():
    for name in ("load", "save", "compress", "compress_model", "CompressConfig", "DataConfig", "StrategyConfig",
                 "EvalConfig", "run_search", "run_ablation", "SearchSetup", "distill", "DistillConfig", "quantize",
                 "bench", "export_onnx", "OnnxExportConfig"):
        assert hasattr(vac, name), name
    assert vac.SearchSetup().ratio == vac.StrategyConfig().ratio  # one default, written once


def test_resolving_defaults_returns_a_new_config():
    cfg = vac.StrategyConfig(method="vac")
    done = cfg.resolved()
    assert cfg.allocation is None and done.allocation == "global" and done is not cfg
    with pytest.raises(Exception):
        cfg.ratio = 2.0  # frozen
