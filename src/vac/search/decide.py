"""The harness of the benchmarks that choose a default (benchmarks/strategy_probe.py, recovery_probe.py).

Each candidate compresses the embedded default (or is a model made elsewhere: ``Decision.score``); the
candidate is scored on the *search* split of every text in ``DECISION_TEXTS`` (``for_decisions``
refuses an evaluation split) and on chat fidelity to the dense model's answers to the ``search``
prompts. The figure of merit is the geometric mean of the PPL ratios candidate/dense over the texts.
Results live in one JSON file, written after every candidate and reused on rerun while the setup is
the same.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

from ..atomic import write_json
from ..config import DECISION_TEXTS, DEFAULT_MODEL, CompressConfig


class Decision:
    """A resumable set of candidates scored on the decision texts at one ratio."""

    def __init__(self, results: Path, windows: int, ratio: float):
        from ..core.evaluate import perplexity
        from ..core.fidelity import chat_fidelity, reference_answers
        from ..data.prompts import prompts
        from ..data.specs import for_decisions
        from ..data.windows import eval_windows
        from ..models.zoo import load_model, resolve_model

        self.results, self.ratio = results, ratio
        doc = json.loads(results.read_text()) if results.is_file() else {}
        setup = {"texts": DECISION_TEXTS, "windows": windows, "ratio": ratio, "model": DEFAULT_MODEL}
        if doc.get("setup") != json.loads(json.dumps(setup)):
            doc = {"setup": setup, "dense": None, "entries": {}}
        self.doc = doc
        self.source = resolve_model(DEFAULT_MODEL)
        self.model, self.tokenizer = load_model(DEFAULT_MODEL)
        texts = {t: eval_windows(self.tokenizer, for_decisions(t), 512, windows) for t in DECISION_TEXTS}
        refs = reference_answers(self.model, self.tokenizer, prompts("search"), source=self.source)
        self.scores = lambda net: {"ppl": {t: perplexity(net, w, progress=False)["ppl"] for t, w in texts.items()},
                                   "chat": chat_fidelity(net, refs)}
        if doc["dense"] is None:
            doc["dense"] = self.scores(self.model)
            write_json(results, doc)

    @property
    def entries(self) -> dict:
        return self.doc["entries"]

    def run(self, key: str, cfg: CompressConfig, **extra) -> dict:
        """Compress a copy of the model with ``cfg``, score it and store the entry under ``key``
        (``extra`` is stored with it); an entry already there is returned as it is."""
        from .. import compress
        from ..data.specs import for_decisions

        if key in self.entries:
            return self.entries[key]
        for_decisions(cfg.data.calib, "a candidate's calibration text")
        net = copy.deepcopy(self.model)
        t0 = time.perf_counter()
        compress(net, self.tokenizer, cfg, source=self.source, progress=False)
        return self.score(key, net, seconds=time.perf_counter() - t0, **extra)

    def score(self, key: str, net, **extra) -> dict:
        """Score an already made candidate ``net`` and store its entry under ``key`` with ``extra``."""
        entry = extra | self.scores(net)
        ratios = [entry["ppl"][t] / self.doc["dense"]["ppl"][t] for t in DECISION_TEXTS]
        entry["geomean_ratio"] = math.exp(sum(map(math.log, ratios)) / len(ratios))
        self.entries[key] = entry
        write_json(self.results, self.doc)
        print(json.dumps({key: entry}), file=sys.stderr, flush=True)
        return entry

    def best(self) -> str:
        return min(self.entries, key=lambda k: self.entries[k]["geomean_ratio"])
