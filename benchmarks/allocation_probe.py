"""Allocation probe: uniform vs knapsack ranks, attention/MLP splits, whitening vs Fisher-weighted
whitening, at one ratio.

Non-sequential compressions of the embedded default from the statistics that benchmarks/quality.py
caches (same calibration windows), each scored on the first 10 windows of the *search* split
(``--data``; an evaluation split is never used to choose), with the kept-rank fraction (min, mean,
max) per matrix type.
A variant is ``method:allocation[:exponent][@attn_ratio]`` (no ``@``: attention and MLP both at the
ratio). Results are appended to results/allocation_probe.json.

    .venv/bin/python benchmarks/allocation_probe.py vac:global whiten:global whiten:uniform vac:uniform
    .venv/bin/python benchmarks/allocation_probe.py vac:uniform@2.6 vac:uniform@3.0 vac:uniform@3.8
"""

import argparse
import collections
import copy
import json
import time
from pathlib import Path

from vac.atomic import write_json
from vac.cache import cached_dense_statistics
from vac.config import DEFAULT_MODEL, DEFAULT_SEARCH, CompressConfig, DataConfig, StrategyConfig
from vac.core.allocate import matrices_of
from vac.core.driver import compress
from vac.core.evaluate import perplexity
from vac.data.specs import for_decisions
from vac.data.windows import eval_windows, sample_windows
from vac.models.families import arch_for
from vac.models.zoo import load_model, resolve_model

DATA = DataConfig()  # the quality benchmark's calibration


def kept_fractions(model, ranks):
    arch, by = arch_for(model), collections.defaultdict(list)
    for m in matrices_of(model):
        r = ranks.get(m.path)
        by[arch.kind(m.path)].append(1.0 if r is None else r / min(m.out_features, m.in_features))
    return {k: [round(min(v), 2), round(sum(v) / len(v), 2), round(max(v), 2)] for k, v in by.items()}


RESULTS = Path(__file__).parent / "results" / "allocation_probe.json"


def main(variants, ratio=1.8, data=DEFAULT_SEARCH):
    base, tok = load_model(DEFAULT_MODEL)
    calib = sample_windows(tok, DATA.calib, DATA.seq_len, DATA.calib_windows, DATA.seed)
    scored = eval_windows(tok, for_decisions(data, "--data"), DATA.seq_len, 10)
    stats = cached_dense_statistics(base, calib, CompressConfig(  # the quality benchmark's shared statistics
        StrategyConfig(method="vac", sequential=False), DATA), resolve_model(DEFAULT_MODEL))
    for variant in variants:
        spec, _, attn = variant.partition("@")
        method, allocation, *exponent = spec.split(":")
        cfg = CompressConfig(StrategyConfig(ratio=ratio, method=method, allocation=allocation, sequential=False,
                                            fisher_exponent=float(exponent[0]) if exponent else None,
                                            attn_ratio=float(attn) if attn else ratio), DATA)
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        result = compress(model, calib, cfg, progress=False, stats=stats)
        ppl = perplexity(model, scored, progress=False)["ppl"]
        row = {"variant": variant, "ratio": ratio, "ratio_reached": round(result.ratio, 4), "data": data,
               "ppl_10x512": ppl, "seconds": time.perf_counter() - t0,
               "kept_fraction_min_mean_max": kept_fractions(base, result.ranks)}
        print(json.dumps(row), flush=True)
        rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
        rows = [r for r in rows if (r["variant"], r["ratio"], r.get("data")) != (variant, ratio, data)] + [row]
        write_json(RESULTS, rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("variants", nargs="*", metavar="method:allocation[:exponent][@attn_ratio]",
                    default=["vac:global", "whiten:global", "whiten:uniform", "vac:uniform"])
    ap.add_argument("--ratio", type=float, default=StrategyConfig.ratio)
    ap.add_argument("--data", default=DEFAULT_SEARCH, help="scored text (a search split, never an eval split)")
    args = ap.parse_args()
    main(args.variants, args.ratio, args.data)
