"""The embedded default at 1.8x on a few windows: vac beats whitening (SVD-LLM), refined beats unrefined.

A reduced protocol (16 calibration windows of 128 tokens from the default calibration mix, 4 Fisher
windows; scored on 8 windows of 128 tokens of each decision text's search split), so the ordering of
the methods is checked on the real model in a few minutes (on both cores, or one per worker: the
suite's one-thread default is for tiny models); the full-size figures are in benchmarks/results/quality.json."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from vac.config import DECISION_TEXTS, DEFAULT_CALIB, DEFAULT_MODEL, CompressConfig
from vac.core.driver import compress
from vac.core.evaluate import perplexity
from vac.data.windows import eval_windows, sample_windows
from vac.models.zoo import load_model

SMALL = dict(ratio=1.8, calib_windows=16, fisher_windows=4, seq_len=128, batch_size=8)


@pytest.fixture
def all_threads():
    """Both cores, unless the suite runs one worker per core (pytest-xdist): then the other worker has one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(2, before))
    yield
    torch.set_num_threads(before)


@pytest.mark.slow(minutes=4)
def test_vac_beats_whitening_and_refinement_helps(all_threads):
    model, tok = load_model(DEFAULT_MODEL)
    calib = sample_windows(tok, DEFAULT_CALIB, 128, 16, seed=0)
    held_out = [eval_windows(tok, spec, 128, 8) for spec in DECISION_TEXTS]

    def geomean_ppl(settings: dict) -> float:
        net = copy.deepcopy(model)
        compress(net, calib, CompressConfig.of(**SMALL, **settings), progress=False)
        return math.exp(sum(math.log(perplexity(net, w, progress=False)["ppl"]) for w in held_out) / len(held_out))

    whiten = geomean_ppl(dict(method="whiten"))
    unrefined = geomean_ppl(dict(method="vac", refine="none"))
    refined = geomean_ppl(dict(method="vac", refine_steps=8))
    assert refined < 0.95 * unrefined < 0.95 * 0.8 * whiten, (whiten, unrefined, refined)
