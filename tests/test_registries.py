"""Methods, allocations and orders are registries: every entry is reachable from the CLI and from a
strategy file, and adding one is one decorated function."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import vac.core.run as run_module
from vac.cli import app
from vac.config import StrategyConfig
from vac.core.allocate import ALLOCATIONS
from vac.core.methods import METHODS, Weighting, register_method
from vac.core.orders import ORDERS
from vac.errors import VacError
from vac.search.run import load_strategy

ENTRIES = [("method", m) for m in METHODS] + [("allocation", a) for a in ALLOCATIONS] + [("order", o) for o in ORDERS]


@pytest.fixture
def captured(monkeypatch):
    """`vac compress` parses its options and hands the config to compress_model: keep it, do nothing."""
    seen = []

    def fake(model, out, config, **kw):
        seen.append(config)
        raise VacError("captured")

    monkeypatch.setattr(run_module, "compress_model", fake)
    return seen


def invoke(*args):
    return CliRunner().invoke(app, ["compress", "--out", "unused", *map(str, args)])


@pytest.mark.parametrize("field, name", ENTRIES)
def test_registered_entry_reachable_from_cli_and_strategy_file(field, name, captured, tmp_path):
    result = invoke(f"--{field}", name)
    assert result.exit_code == 2 and "error: captured" in result.stderr
    assert getattr(captured[-1].strategy, field) == name
    (tmp_path / "s.json").write_text(json.dumps({"format": "vac-strategy/1", "config": {field: name}}))
    assert getattr(load_strategy(tmp_path / "s.json"), field) == name
    result = invoke("--strategy", tmp_path / "s.json")
    assert getattr(captured[-1].strategy, field) == name


def test_cli_help_lists_every_registered_name():
    text = CliRunner().invoke(app, ["compress", "--help"], env={"COLUMNS": "1000"}).stdout
    for _, name in ENTRIES:
        assert name in text


def test_a_new_method_is_one_decorated_function(captured):
    @register_method("unit-test-svd", allocation="depth")
    def _plain(inputs, fisher, exponent, alpha):
        return Weighting()

    try:
        assert StrategyConfig(method="unit-test-svd").resolved().allocation == "depth"
        assert invoke("--method", "unit-test-svd").exit_code == 2
        assert captured[-1].strategy.method == "unit-test-svd"
    finally:
        del METHODS["unit-test-svd"]
    with pytest.raises(VacError, match="unknown method"):
        StrategyConfig(method="unit-test-svd")


@pytest.mark.parametrize("config, message", [
    ({"type_weights": {"q": "x"}}, "type_weights must map"),
    ({"ratio": "2"}, "field 'ratio' must be float"),
    ({"order": "1,,0"}, "integers only"),
    ({"sequential": 1}, "field 'sequential'"),
])
def test_strategy_file_validated_field_by_field(config, message, tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"config": config}))
    with pytest.raises(VacError, match=message):
        load_strategy(tmp_path / "s.json")
