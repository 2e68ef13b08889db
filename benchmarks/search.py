"""Search benchmark: evolutionary strategy search on the embedded default at 1.8x, at most 60 minutes.

Runs :func:`vac.search.run.run_search` (fitness on austen:search by the default proxy, each genome's
short sequential compression with refinement; the top-k and the default re-scored with the full
sequential config, the winner and the default scored once on austen:eval) and writes
``benchmarks/results/search.json`` with ``default_ppl`` and ``best_ppl``
(eval PPL of the default strategy and of the winner), ``minutes``, ``ratio_reached`` and the winning
strategy, plus a plain verdict (a gain, or no gain, with the numbers). The search state and caches
live in ``--work`` (outside the repository: the statistics and factor caches take ~2 GB for the
135M model); rerunning the command resumes.

    .venv/bin/python benchmarks/search.py              # full run (<= 60 min on 2 cores; top-1, population 6)
    .venv/bin/python benchmarks/search.py --ablation   # the ablation table, same --work (~50 min)
    .venv/bin/python benchmarks/search.py --minutes 3 --calib-windows 4 \\
        --fisher-windows 2 --seq-len 64 --search-windows 2 --eval-windows 2 --population 3 \\
        --generations 1 --top-k 1 --work /tmp/vac-search-smoke --out /tmp/vac-search-smoke.json

The smoke line is an end-to-end check; its floor is the statistics plus one full sequential
compression of the default (about 4.5 min on a busy 2-core machine: 420 weighted SVDs), so the budget
stops it before any generation. The committed results ran on a quiet machine with torch's default
threads (2); on a CPU shared with other jobs prefix ``OMP_NUM_THREADS=1`` (there one OpenMP thread was
2x (large matmuls) to 800x (tiny ones) faster than two).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from vac.atomic import write_json
from vac.cache import cache_dir
from vac.config import DEFAULT_CALIB, DEFAULT_EVAL, DEFAULT_SEARCH
from vac.search.ablation import run_ablation
from vac.search.run import run_search
from vac.search.space import SearchSetup

RESULTS = Path(__file__).parent / "results"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=1.8)
    ap.add_argument("--minutes", type=float, default=60.0, help="budget of the whole run (statistics included)")
    ap.add_argument("--generations", type=int, default=20, help="upper bound; the budget usually stops first")
    # a short score costs ~2 min and a full re-score ~12 on 2 cores: 6 genomes a generation and one
    # re-score leave room for 3 generations in 60 minutes
    ap.add_argument("--population", type=int, default=6)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--search-data", default=DEFAULT_SEARCH)
    ap.add_argument("--search-windows", type=int, default=8)
    ap.add_argument("--eval", default=DEFAULT_EVAL)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--calib", default=DEFAULT_CALIB)
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--fisher-windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--work", type=Path, default=cache_dir() / "runs" / "search-benchmark")
    ap.add_argument("--out", type=Path, default=RESULTS / "search.json")
    ap.add_argument("--ablation", action="store_true", help="instead of the search: the ablation study "
                    "(vac search --ablation) in --work, copied to results/ablation.{json,md}")
    args = ap.parse_args(argv)

    setup = SearchSetup(
        model=args.model, ratio=args.ratio, population=args.population, seed=args.seed,
        search_data=args.search_data, search_windows=args.search_windows, eval_data=args.eval,
        eval_windows=args.eval_windows, calib=args.calib, calib_windows=args.calib_windows,
        fisher_windows=args.fisher_windows, seq_len=args.seq_len, top_k=args.top_k,
    )
    if args.ablation:
        run_ablation(setup, args.work)
        for suffix in (".json", ".md"):
            shutil.copyfile(args.work / f"ablation{suffix}", RESULTS / f"ablation{suffix}")
        print((RESULTS / "ablation.md").read_text())
        return
    summary = run_search(setup, args.work, args.generations, budget_minutes=args.minutes, workers=args.workers)
    w, d = summary["winner"], summary["default"]
    default_ppl, best_ppl = d["eval_ppl"], w["eval_ppl"]
    if w["is_default"]:
        verdict = (f"no gain: no strategy beat the default on the search split after "
                   f"{summary['generations_done']} generations ({summary['evaluated']} genomes); the default "
                   f"stays (search PPL {d['search_ppl']:.3f}, eval PPL {default_ppl:.3f})")
    elif abs(best_ppl / default_ppl - 1) < 0.005:
        verdict = (f"no meaningful gain: eval PPL {default_ppl:.3f} -> {best_ppl:.3f} "
                   f"({100 * (best_ppl / default_ppl - 1):+.2f}%, under 0.5%), search PPL {d['search_ppl']:.3f} -> "
                   f"{w['search_ppl']:.3f}")
    elif best_ppl < default_ppl:
        verdict = (f"gain: eval PPL {default_ppl:.3f} -> {best_ppl:.3f} "
                   f"({100 * (best_ppl / default_ppl - 1):+.2f}%), search PPL {d['search_ppl']:.3f} -> "
                   f"{w['search_ppl']:.3f}, at the same parameter budget")
    else:
        verdict = (f"no gain on eval: the winner beat the default on the search split ({d['search_ppl']:.3f} -> "
                   f"{w['search_ppl']:.3f}) but not on the eval split ({default_ppl:.3f} -> {best_ppl:.3f}); "
                   f"the search overfit its {args.search_windows} search windows")
    result = {
        "default_ppl": default_ppl, "best_ppl": best_ppl, "minutes": summary["minutes"],
        "ratio_reached": w["ratio_reached"], "default_ratio_reached": d["ratio_reached"],
        "default_search_ppl": d["search_ppl"], "best_search_ppl": w["search_ppl"],
        "verdict": verdict, "strategy": w["config"], "winner": w["describe"],
        "generations_done": summary["generations_done"], "stopped": summary["stopped"],
        "genomes_scored": summary["evaluated"], "fitness": summary["fitness"], "protocol": summary["protocol"],
        "history": summary["history"], "final_candidates": summary["final_candidates"],
        "setup": summary["setup"], "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "reproduce": summary["reproduce"],
    }
    write_json(args.out, result, indent=2)  # creates args.out's folder, where the copies below go
    shutil.copyfile(args.work / "strategy.json", args.out.with_name(args.out.stem + "-strategy.json"))
    shutil.copyfile(args.work / "fitness.png", args.out.with_suffix(".png"))
    print(verdict)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
