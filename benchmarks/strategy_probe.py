"""Which strategy settings should be vac's defaults? Decided on the search splits only.

Each candidate (strategy settings over `vac compress`'s defaults: the refinement's target, steps and
learning rate, the allocation, ...) compresses the embedded default at 1.8x with the other defaults (in
memory: the same numbers as streamed); the compressed
model is scored on the search split of each text in ``vac.config.DECISION_TEXTS`` and on chat fidelity
to the dense model's answers to the ``search`` prompts, as benchmarks/calibration_mix.py does. The figure
of merit is the geometric mean of the PPL ratios compressed/dense. No evaluation split is read. Results →
results/strategy_probe.json (resumable, one entry per candidate).

    .venv/bin/python benchmarks/strategy_probe.py
    .venv/bin/python benchmarks/strategy_probe.py --candidates '{"refine": "own", "refine_lr": 3e-4}'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vac import CompressConfig
from vac.config import DECISION_TEXTS
from vac.search.decide import Decision

RESULTS = Path(__file__).parent / "results" / "strategy_probe.json"
CANDIDATES = (  # what results/strategy_probe.json holds, over today's defaults
    {"allocation": "depth", "refine": "none", "refine_lr": 1e-4},  # the defaults before
    {"allocation": "depth", "refine": "none", "correct": True},
    {"allocation": "depth", "refine": "own"},
    {"allocation": "depth", "refine": "own", "refine_lr": 1e-3},
    {"allocation": "depth"},
    {"refine": "own"},
    {},
    {"fisher_exponent": 0.5},
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", nargs="+", type=json.loads, default=list(CANDIDATES),
                    help="strategy settings as JSON objects")
    ap.add_argument("--windows", type=int, default=20, help="search windows per text (512 tokens)")
    ap.add_argument("--ratio", type=float, default=1.8)
    ap.add_argument("--table", action="store_true", help="print the table of the results and exit")
    args = ap.parse_args(argv)
    if args.table:
        return table(json.loads(RESULTS.read_text()))
    decision = Decision(RESULTS, args.windows, args.ratio)
    for settings in args.candidates:
        cfg = CompressConfig.of(ratio=args.ratio, **settings)
        # keyed by the whole resolved config: an entry stays valid when a default changes
        decision.run(json.dumps(cfg.resolved().to_dict(), sort_keys=True), cfg, settings=settings)
    doc = decision.doc
    table(doc)


def table(doc: dict) -> None:
    """Each entry by how its config differs from today's defaults (an entry keeps the config it ran)."""
    now = CompressConfig.of(ratio=doc["setup"]["ratio"]).resolved().to_dict()
    best = min(doc["entries"], key=lambda k: doc["entries"][k]["geomean_ratio"])
    print(f"{'config (vs the defaults)':64s} " + " ".join(f"{t:>16s}" for t in DECISION_TEXTS)
          + "  geomean  chat top-1  seconds")
    print(f"{'dense model':64s} " + " ".join(f"{doc['dense']['ppl'][t]:16.2f}" for t in DECISION_TEXTS))
    for key, e in doc["entries"].items():
        ran = json.loads(key)
        diff = {k: v for part in ("data", "strategy") for k, v in ran[part].items() if now[part].get(k) != v
                and not (k.startswith("refine_") and ran["strategy"]["refine"] == "none")}  # moot settings
        name = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in diff.items()) or "defaults"
        mark = " *" if key == best else ""
        print(f"{name:64s} " + " ".join(f"{e['ppl'][t]:16.2f}" for t in DECISION_TEXTS)
              + f"  {e['geomean_ratio']:7.2f}  {e['chat']['top1_agreement']:9.1%}  {e['seconds']:7.0f}{mark}")


if __name__ == "__main__":
    main()
