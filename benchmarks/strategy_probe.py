"""Which strategy settings should be vac's defaults? Decided on the search splits only.

Each candidate (strategy settings over `vac compress`'s defaults: the refinement's target, steps and
learning rate, the allocation, ...) compresses the embedded default at 1.8x with the other defaults (in
memory: the same numbers as streamed); the compressed
model is scored on the search split of each text in ``vac.config.DECISION_TEXTS`` and on chat fidelity
to the dense model's answers to the ``search`` prompts (vac.search.decide). The figure
of merit is the geometric mean of the PPL ratios compressed/dense. No evaluation split is read. Results →
results/strategy_probe.json (resumable, one entry per candidate).

    .venv/bin/python benchmarks/strategy_probe.py
    .venv/bin/python benchmarks/strategy_probe.py --candidates '{"refine": "own", "refine_lr": 3e-4}'

A candidate's ``calib`` (the calibration text; calib or search splits only) may name ``{self}``: the
dense model's own chat answers to the calib prompts (vac.data.selftext); the entry keeps the spec as
written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vac import CompressConfig
from vac.config import DECISION_TEXTS
from vac.data.selftext import cached_self_text
from vac.search.decide import Decision

RESULTS = Path(__file__).parent / "results" / "strategy_probe.json"
_SPLIT_BEFORE = {"attn_ratio": 3.0}  # attention 3.0x at 1.8x: the split share 2.5 before 1.75
_BEFORE = {"allocation": "depth", "refine": "none", "refine_lr": 1e-4} | _SPLIT_BEFORE  # before refinement
CANDIDATES = (  # what results/strategy_probe.json holds, over today's defaults
    _BEFORE,
    # the calibration text, chosen under the defaults before refinement ({self}: see above)
    _BEFORE | {"calib": "web-bible:calib+shakespeare:calib"},  # the default calibration before
    _BEFORE | {"calib": "handbook:calib"},
    _BEFORE | {"calib": "handbook:calib+{self}"},
    _BEFORE | {"calib": "web-bible:calib+shakespeare:calib+handbook:calib+{self}"},
    {"allocation": "depth", "refine": "none", "correct": True} | _SPLIT_BEFORE,
    {"allocation": "depth", "refine": "own"} | _SPLIT_BEFORE,
    {"allocation": "depth", "refine": "own", "refine_lr": 1e-3} | _SPLIT_BEFORE,
    {"allocation": "depth"} | _SPLIT_BEFORE,
    {"refine": "own"} | _SPLIT_BEFORE,
    {"fisher_exponent": 0.5} | _SPLIT_BEFORE,
    _SPLIT_BEFORE,
    {"attn_ratio": 3.4},
    {},
    {"attn_ratio": 2.0},
    {"calib": "web-bible:calib+shakespeare:calib+handbook:calib+{self}"},
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
        key = json.dumps(cfg.resolved().to_dict(), sort_keys=True)
        if key in decision.entries:
            continue
        calib = cfg.data.calib
        if "{self}" in calib:  # the cached file's path is this machine's: the key keeps the spec as written
            calib = calib.format(self=cached_self_text(decision.model, decision.tokenizer, decision.source))
            cfg = CompressConfig.of(ratio=args.ratio, **(settings | {"calib": calib}))
        decision.run(key, cfg, settings=settings)
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
