"""Does a short sequential compression rank genomes as the full compression does? (issue #15)

The search's truncation proxy (cached factors, no sequential pass, no refinement) misranked genomes
under the refined full pipeline (results/search.json: the default ranked 5th of 38 by the proxy, the
proxy-best genome 16% worse in full). The *short score* is what the search scores each layer order
with (``InMemoryEngine.short_score``), applied to a genome's every gene: the genome compressed
sequentially, refinement included, from ``SearchSetup.order_windows`` calibration windows of
``order_seq_len`` tokens, with ``--steps`` refinement steps per layer; its perplexity on the search
split. The short compressions take the full run's dense statistics (Fisher and allocation curves from
its first 16 calibration windows of 512 tokens; ``InMemoryEngine.short_score``). Entries labelled
"N, short statistics" were made before that change (commit e3ce4e0: the short compression computed its
own statistics from the 8 short windows; the 24-step order scores come from results/order_proxy.json,
made so): with them the exponent was misranked as by the truncation proxy, the reason for the change.
Here it is measured for genomes whose full score (what ``vac compress`` computes, 64 × 512
windows) is on record in results/search.json or results/order_proxy.json (the entry says which) or
computed with ``--full``. No evaluation split is read. Results → results/short_proxy.json, saved
after every score (rerun to continue).

    .venv/bin/python benchmarks/short_proxy.py --steps 8
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from order_proxy import setup_key, spearman

from vac.atomic import write_json
from vac.config import StrategyConfig
from vac.core.orders import layer_order
from vac.data.specs import for_decisions
from vac.data.windows import eval_windows, sample_windows
from vac.models.families import arch_for
from vac.search.scoring import InMemoryEngine
from vac.search.space import Genome, SearchSetup

HERE = Path(__file__).parent / "results"
RESULTS = HERE / "short_proxy.json"


def genomes(n_layers: int) -> dict[str, Genome]:
    d = Genome.default(n_layers)
    return {
        "default": d,
        "exponent 1": replace(d, exponent=1.0),  # the truncation proxy's best of the 60-min search
        "middle-out": replace(d, order=tuple(layer_order("middle-out", n_layers))),
        "outward:7": replace(d, order=tuple(layer_order("outward:7", n_layers))),
        "outward:2": replace(d, order=tuple(layer_order("outward:2", n_layers))),  # the short-proxy search's pick
    }


# what a full score depends on besides the genome (the search benchmark's setup differs in the rest)
FULL_FIELDS = ("model", "ratio", "search_data", "search_windows", "calib", "calib_windows", "fisher_windows",
               "seq_len", "rank_step", "rank_floor")


def recorded_full(g: Genome, setup: SearchSetup) -> dict | None:
    """A full score of ``g`` on record (same data, rank grid and defaults), with where it came from."""
    search = json.loads((HERE / "search.json").read_text())
    same = all(search["setup"][k] == setup.to_json()[k] for k in FULL_FIELDS)
    # the settings no gene sets (refinement, rank grid, ...) of its winner's strategy must be today's defaults
    genes = {"method", "order", "fisher_exponent", "attn_ratio", "allocation", "type_weights"}
    defaults = StrategyConfig(ratio=setup.ratio).resolved().to_dict()
    same &= all(search["strategy"][k] == v for k, v in defaults.items() if k not in genes)
    for c in search.get("final_candidates", []) if same else []:
        if Genome.from_dict(c["genome"]) == g:
            return {"score": c["search_ppl"], "from": "results/search.json (final_candidates)"}
    orders = json.loads((HERE / "order_proxy.json").read_text())
    if orders["setup"] != setup_key(setup):
        return None
    for e in orders["entries"].values():
        if replace(Genome.default(len(g.order)), order=tuple(e["layers"])) == g and "full" in e:
            return {"score": e["full"]["score"], "from": "results/order_proxy.json"}
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[8], help="refinement steps of the short score")
    ap.add_argument("--genomes", nargs="+", default=None, help="names from genomes() (default: all)")
    ap.add_argument("--full", action="store_true", help="compute the full scores not on record")
    args = ap.parse_args(argv)
    setup = SearchSetup(eval_data="")
    key = setup_key(setup)
    doc = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if doc.get("setup") != key:
        doc = {"setup": key, "entries": {}}
    engine = InMemoryEngine(setup, Path.home() / ".cache" / "vac" / "bench" / "short_proxy", progress=True, log=print)
    tok = engine.tokenizer
    calib = sample_windows(tok, setup.calib, setup.seq_len, setup.calib_windows, seed=0)
    windows = eval_windows(tok, for_decisions(setup.search_data), setup.seq_len, setup.search_windows)
    small = setup.order_calibration(tok)
    engine.prepare(calib, windows)
    n_layers = len(engine.model.get_submodule(arch_for(engine.model).layers))
    todo = {k: g for k, g in genomes(n_layers).items() if not args.genomes or k in args.genomes}
    for name, g in todo.items():
        entry = doc["entries"].setdefault(name, {"genome": g.to_dict(), "describe": g.describe(), "short": {}})
        entry["full"] = entry.get("full") or recorded_full(g, setup)
        write_json(RESULTS, doc)
    for steps in args.steps:
        engine.setup = replace(setup, order_refine_steps=steps)
        label = str(steps)
        for name, g in todo.items():
            entry = doc["entries"][name]
            if label in entry["short"]:
                continue
            t0 = time.perf_counter()
            score = engine.short_score(g, small)["score"]
            entry["short"][label] = {"score": score, "seconds": time.perf_counter() - t0}
            write_json(RESULTS, doc)
            print(f"{name}: short score at {steps} steps {score:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.full:
        for name, g in todo.items():
            entry = doc["entries"][name]
            if not entry.get("full"):
                t0 = time.perf_counter()
                entry["full"] = {"score": engine.full(g)[0]["score"], "seconds": time.perf_counter() - t0}
                write_json(RESULTS, doc)
    doc["spearman"] = {}
    for steps in sorted({s for e in doc["entries"].values() for s in e["short"]}):
        both = [e for e in doc["entries"].values() if steps in e["short"] and e.get("full")]
        if len(both) >= 3:
            doc["spearman"][steps] = {"rho": spearman([e["short"][steps]["score"] for e in both],
                                                      [e["full"]["score"] for e in both]), "over": len(both)}
    write_json(RESULTS, doc)
    for name, e in doc["entries"].items():
        shorts = "  ".join(f"[{s}] {v['score']:.2f} ({v['seconds']:.0f} s)" for s, v in e["short"].items())
        print(f"{name:12s} full {e['full']['score'] if e.get('full') else float('nan'):8.2f}  {shorts}")
    print("Spearman:", doc["spearman"])


if __name__ == "__main__":
    main()
