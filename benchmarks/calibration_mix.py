"""Which calibration text should be the default? Decided on the search splits only.

Each candidate calibration spec compresses the embedded default at 1.8x with `vac compress`'s
defaults (in memory, the same numbers as streamed); the compressed model is scored on the *search*
split of every corpus that has one in ``vac.config.DECISION_TEXTS`` (a novel, a modern technical book, the GNU
maintainers' guide) and on chat fidelity to the dense model's answers to the ``search`` prompts. The
figure of merit is the geometric mean of the PPL ratios compressed/dense over the texts. No
evaluation split is read. Results → results/calibration_mix.json (resumable, one entry per spec).

    .venv/bin/python benchmarks/calibration_mix.py
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

from vac import CompressConfig, compress
from vac.atomic import write_json
from vac.config import DECISION_TEXTS, DEFAULT_MODEL
from vac.core.evaluate import perplexity
from vac.core.fidelity import chat_fidelity, reference_answers
from vac.data.prompts import prompts
from vac.data.selftext import cached_self_text
from vac.data.specs import for_decisions
from vac.data.windows import eval_windows
from vac.models.zoo import load_model, resolve_model

RESULTS = Path(__file__).parent / "results" / "calibration_mix.json"
CANDIDATES = (
    "web-bible:calib+shakespeare:calib",  # the default before this benchmark
    "web-bible:calib+shakespeare:calib+handbook:calib",
    "handbook:calib",
    "handbook:calib+{self}",
    "web-bible:calib+shakespeare:calib+handbook:calib+{self}",
)  # {self}: the dense model's own answers to the calib prompts (vac.data.selftext)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", nargs="+", default=list(CANDIDATES))
    ap.add_argument("--windows", type=int, default=20, help="search windows per text (512 tokens)")
    ap.add_argument("--ratio", type=float, default=1.8)
    args = ap.parse_args(argv)
    doc = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    setup = {"texts": DECISION_TEXTS, "windows": args.windows, "ratio": args.ratio, "model": DEFAULT_MODEL}
    if doc.get("setup") != json.loads(json.dumps(setup)):
        doc = {"setup": setup, "dense": None, "entries": {}}
    model, tok = load_model(DEFAULT_MODEL)
    windows = {t: eval_windows(tok, for_decisions(t), 512, args.windows) for t in DECISION_TEXTS}
    refs = reference_answers(model, tok, prompts("search"), source=resolve_model(DEFAULT_MODEL))

    def scores(net) -> dict:
        return {"ppl": {t: perplexity(net, w, progress=False)["ppl"] for t, w in windows.items()},
                "chat": chat_fidelity(net, refs)}

    if doc["dense"] is None:
        doc["dense"] = scores(model)
        write_json(RESULTS, doc)
    for spec in args.calib:
        if spec in doc["entries"]:
            continue
        calib = spec.format(self=cached_self_text(model, tok, resolve_model(DEFAULT_MODEL))) if "{self}" in spec else spec
        for_decisions(calib, "a calibration candidate")
        net = copy.deepcopy(model)
        t0 = time.perf_counter()
        cfg = CompressConfig.of(ratio=args.ratio, calib=calib)
        compress(net, tok, cfg, source=resolve_model(DEFAULT_MODEL), progress=False)
        entry = scores(net) | {"seconds": time.perf_counter() - t0}
        ratios = [entry["ppl"][t] / doc["dense"]["ppl"][t] for t in DECISION_TEXTS]
        entry["geomean_ratio"] = math.exp(sum(map(math.log, ratios)) / len(ratios))
        doc["entries"][spec] = entry
        write_json(RESULTS, doc)
        print(json.dumps({spec: entry}), file=sys.stderr, flush=True)
        del net
    best = min(doc["entries"], key=lambda k: doc["entries"][k]["geomean_ratio"])
    print(f"{'calibration':60s} " + " ".join(f"{t:>16s}" for t in DECISION_TEXTS) + "  geomean  chat top-1")
    print(f"{'dense':60s} " + " ".join(f"{doc['dense']['ppl'][t]:16.2f}" for t in DECISION_TEXTS))
    for spec, e in doc["entries"].items():
        mark = " *" if spec == best else ""
        print(f"{spec:60s} " + " ".join(f"{e['ppl'][t]:16.2f}" for t in DECISION_TEXTS)
              + f"  {e['geomean_ratio']:7.2f}  {e['chat']['top1_agreement']:.1%}{mark}")


if __name__ == "__main__":
    main()
