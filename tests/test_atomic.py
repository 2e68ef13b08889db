"""vac.atomic: a failed write leaves the old file and no temporary behind."""

from __future__ import annotations

import json

import pytest
import torch

from vac.atomic import atomic_write, torch_save, write_json


def test_writes_text_bytes_json_and_tensors(tmp_path):
    assert atomic_write(tmp_path / "a" / "t.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    assert atomic_write(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert json.loads(write_json(tmp_path / "c.json", {"x": [1, 2]}).read_text()) == {"x": [1, 2]}
    assert torch.equal(torch.load(torch_save(torch.arange(3), tmp_path / "d.pt")), torch.arange(3))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b.bin", "c.json", "d.pt", "t.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = write_json(tmp_path / "state.json", {"step": 1})

    def broken(tmp):
        tmp.write_text('{"step": 2')  # half written, then the writer dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
