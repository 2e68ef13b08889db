"""Does the search's order score rank layer orders as the full compression does? (issue #15)

For each layer order, the default genes (vac, its Fisher exponent, split and allocation, refinement)
in that order are scored twice, by the same functions ``vac search`` uses
(:class:`vac.search.scoring.InMemoryEngine`): the *order score* (``short_score``: sequential, from
``SearchSetup.order_windows`` calibration windows of ``order_seq_len`` tokens, with the full run's dense
statistics; the scores made before with the short windows' own statistics are kept as
``order_short_statistics``) and the *full score*
(``full``: what ``vac compress`` computes, 64 windows of 512 tokens); both are perplexities on the
search split (``SearchSetup.search_data``, first ``search_windows`` windows). No evaluation split is
read. Reported: both scores and their seconds per order, and Spearman's rank correlation over the
orders that have both. Results → results/order_proxy.json, saved after every score (rerun the same
command to continue; the order scores come first, they are cheap).

    .venv/bin/python benchmarks/order_proxy.py
    .venv/bin/python benchmarks/order_proxy.py --orders front-to-back middle-out outward:7
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from vac.atomic import write_json
from vac.config import StrategyConfig
from vac.core.orders import describe_order, layer_order
from vac.data.specs import for_decisions
from vac.data.windows import eval_windows, sample_windows
from vac.models.families import arch_for
from vac.search.scoring import InMemoryEngine
from vac.search.space import Genome, SearchSetup

RESULTS = Path(__file__).parent / "results" / "order_proxy.json"
# the three named orders and two outward starts off the middle, one per side
ORDERS = ("front-to-back", "middle-out", "back-to-front", "outward:7", "outward:22:down")


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among perplexities). scipy.stats.spearmanr was
    considered: scipy is not among vac's dependencies, and five lines do not justify one."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0] * len(v)
        for rank, i in enumerate(order):
            r[i] = rank
        return r

    rx, ry, n = ranks(xs), ranks(ys), len(xs)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))


def setup_key(setup: SearchSetup) -> dict:
    """What the scores depend on: the setup and the default genes each genome is scored with (entries
    made under other defaults are not reused), and the short compressions' statistics: the full run's
    (before: their own, from the short windows; the order scores made so are kept in the entries as
    ``order_short_statistics``)."""
    return setup.to_json() | {"defaults": StrategyConfig(ratio=setup.ratio).resolved().to_dict(),
                              "short_statistics": "full"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", nargs="+", default=list(ORDERS), help="layer orders (vac compress --order syntax)")
    ap.add_argument("--no-full", action="store_true", help="the order scores only")
    args = ap.parse_args(argv)
    setup = SearchSetup(eval_data="")  # no evaluation text: the scores rank orders for the search
    key = setup_key(setup)
    doc = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if doc.get("setup") != key:
        doc = {"setup": key, "entries": {}}
    engine = InMemoryEngine(setup, Path.home() / ".cache" / "vac" / "bench" / "order_proxy", progress=True,
                            log=print)
    tok = engine.tokenizer
    calib = sample_windows(tok, setup.calib, setup.seq_len, setup.calib_windows, seed=0)
    windows = eval_windows(tok, for_decisions(setup.search_data), setup.seq_len, setup.search_windows)
    small = setup.order_calibration(tok)
    t0 = time.perf_counter()
    engine.prepare(calib, windows)
    doc["statistics_s"] = doc.get("statistics_s") or time.perf_counter() - t0
    n_layers = len(engine.model.get_submodule(arch_for(engine.model).layers))
    default = Genome.default(n_layers)
    genomes = {name: replace(default, order=tuple(layer_order(name, n_layers))) for name in args.orders}
    for phase in ("order", "full"):
        if phase == "full" and args.no_full:
            break
        for name, g in genomes.items():
            entry = doc["entries"].setdefault(name, {"layers": list(g.order), "describe": describe_order(g.order)})
            if phase in entry:
                continue
            t0 = time.perf_counter()
            score = engine.short_score(g, small)["score"] if phase == "order" else engine.full(g)[0]["score"]
            entry[phase] = {"score": score, "seconds": time.perf_counter() - t0}
            write_json(RESULTS, doc)
            print(f"{name}: {phase} score {score:.3f} ({entry[phase]['seconds']:.0f} s)", flush=True)
    both = [e for e in doc["entries"].values() if "order" in e and "full" in e]
    if len(both) >= 3:
        doc["spearman"] = spearman([e["order"]["score"] for e in both], [e["full"]["score"] for e in both])
        doc["spearman_over"] = len(both)
    write_json(RESULTS, doc)
    table(doc)


def table(doc: dict) -> None:
    print(f"{'order':36s} {'order score':>12s} {'s':>6s} {'full score':>11s} {'s':>6s}")
    for name, e in doc["entries"].items():
        o, f = e.get("order"), e.get("full")
        print(f"{e['describe']:36s} " + (f"{o['score']:12.3f} {o['seconds']:6.0f}" if o else f"{'-':>12s} {'':6s}")
              + (f" {f['score']:11.3f} {f['seconds']:6.0f}" if f else f" {'-':>11s}"))
    if "spearman" in doc:
        print(f"Spearman rank correlation over {doc['spearman_over']} orders: {doc['spearman']:.2f}")


if __name__ == "__main__":
    main()
