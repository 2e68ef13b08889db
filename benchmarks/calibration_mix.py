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
from pathlib import Path

from vac import CompressConfig
from vac.config import DECISION_TEXTS, DEFAULT_MODEL
from vac.data.selftext import cached_self_text
from vac.data.specs import for_decisions
from vac.models.zoo import resolve_model
from vac.search.decide import Decision

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
    decision = Decision(RESULTS, args.windows, args.ratio)
    model, tok, doc = decision.model, decision.tokenizer, decision.doc
    for spec in args.calib:
        if spec in doc["entries"]:
            continue
        calib = spec.format(self=cached_self_text(model, tok, resolve_model(DEFAULT_MODEL))) if "{self}" in spec else spec
        decision.run(spec, CompressConfig.of(ratio=args.ratio, calib=for_decisions(calib, "a calibration candidate")))
    best = decision.best()
    print(f"{'calibration':60s} " + " ".join(f"{t:>16s}" for t in DECISION_TEXTS) + "  geomean  chat top-1")
    print(f"{'dense':60s} " + " ".join(f"{doc['dense']['ppl'][t]:16.2f}" for t in DECISION_TEXTS))
    for spec, e in doc["entries"].items():
        mark = " *" if spec == best else ""
        print(f"{spec:60s} " + " ".join(f"{e['ppl'][t]:16.2f}" for t in DECISION_TEXTS)
              + f"  {e['geomean_ratio']:7.2f}  {e['chat']['top1_agreement']:.1%}{mark}")


if __name__ == "__main__":
    main()
