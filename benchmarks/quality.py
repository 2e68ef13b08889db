"""Quality benchmark: held-out PPL of svd, fwsvd, asvd, whiten and vac at several ratios, one run.

Every entry is scored on several held-out texts of different kinds (``REPORT_EVALS``: a 19th-century
novel, a modern technical book, and the GNU standards, which no calibration source resembles) and on
chat fidelity (:mod:`vac.core.fidelity`: top-1 agreement with the dense model's greedy answers to
held-out prompts, and the PPL of those answers). All methods share the same calibration windows; each
entry is what `vac compress --in-memory` computes for that method (its own dense statistics, cached
per part; the same numbers as the streamed default). Results are written
after every entry and reused on rerun (resume), as JSON, markdown tables and a PNG of PPL vs ratio.

    .venv/bin/python benchmarks/quality.py            # full run (about an hour on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from vac.atomic import write_json
from vac.config import DEFAULT_MODEL, REPORT_EVALS, CompressConfig, DataConfig, EvalConfig, StrategyConfig
from vac.core.evaluate import perplexity
from vac.core.fidelity import chat_fidelity, reference_answers
from vac.core.run import in_memory_compress
from vac.data.prompts import prompts
from vac.data.windows import eval_windows, sample_windows
from vac.models.zoo import load_model, resolve_model

RESULTS = Path(__file__).parent / "results"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.25, 1.5, 1.8, 2.0])
    ap.add_argument("--methods", nargs="+", default=["svd", "fwsvd", "asvd", "whiten", "vac"])
    ap.add_argument("--calib", default=DataConfig.calib)
    ap.add_argument("--calib-windows", type=int, default=DataConfig.calib_windows)
    ap.add_argument("--fisher-windows", type=int, default=DataConfig.fisher_windows)
    ap.add_argument("--eval", nargs="+", default=list(REPORT_EVALS), help="held-out texts (reporting only)")
    ap.add_argument("--eval-windows", type=int, default=EvalConfig.windows)
    ap.add_argument("--seq-len", type=int, default=DataConfig.seq_len)
    ap.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = ap.parse_args(argv)

    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    setup["ratios"], setup["methods"] = sorted(setup["ratios"]), sorted(setup["methods"])
    # each method's defaults (at --ratio 1.8): results of other defaults are not reused
    setup["defaults"] = {m: StrategyConfig(method=m).resolved().to_dict() for m in setup["methods"]}
    result = {"setup": setup, "dense": None, "entries": []}
    if args.out.is_file():
        previous = json.loads(args.out.read_text())
        if previous.get("setup") == setup:
            result = previous
    done = {(e["method"], e["ratio"]) for e in result["entries"]}

    model, tok = load_model(args.model)
    calib = sample_windows(tok, args.calib, args.seq_len, args.calib_windows, seed=0)
    held_out = {spec: eval_windows(tok, spec, args.seq_len, args.eval_windows) for spec in args.eval}
    references = reference_answers(model, tok, prompts("eval"), source=resolve_model(args.model))

    def scores(net) -> dict:
        return {"ppl": {spec: perplexity(net, w, progress=False)["ppl"] for spec, w in held_out.items()},
                "chat": chat_fidelity(net, references)}

    if result["dense"] is None:
        result["dense"] = scores(model)
        save(result, args.out)
    data = DataConfig(calib=args.calib, calib_windows=args.calib_windows, fisher_windows=args.fisher_windows,
                      seq_len=args.seq_len)
    for ratio in args.ratios:
        for method in args.methods:
            if (method, ratio) in done:
                continue
            cfg = CompressConfig(StrategyConfig(ratio=ratio, method=method), data).resolved()
            student = copy.deepcopy(model)
            t0 = time.perf_counter()
            # what `vac compress --in-memory` runs: each method's own dense statistics (cached per part)
            res = in_memory_compress(student, tok, cfg, calibration=calib, source=resolve_model(args.model),
                                     progress=False)
            seconds = time.perf_counter() - t0
            s = cfg.strategy
            entry = {"method": method, "ratio": ratio, "ratio_reached": res.ratio, **scores(student),
                     "allocation": s.allocation, "sequential": s.sequential, "order": s.order,
                     "fisher_exponent": s.fisher_exponent, "attn_ratio": s.attn_ratio, "refine": s.refine,
                     "params_after": res.params_after, "seconds": seconds}
            print(json.dumps(entry), file=sys.stderr, flush=True)
            result["entries"].append(entry)
            save(result, args.out)
            del student
    write_table(result, args.out.with_suffix(".md"))
    plot(result, args.out.with_suffix(".png"))


def save(result, path: Path):
    write_json(path, result, indent=2)


def fmt(x: float) -> str:
    return f"{x:.1f}" if x < 1e4 else f"{x:.2e}"


def write_table(result, path: Path):
    """One PPL table per held-out text (with each method's ratio to whitening), and the chat table."""
    ratios = sorted({e["ratio"] for e in result["entries"]})
    methods = list(dict.fromkeys(e["method"] for e in result["entries"]))
    by = {(e["method"], e["ratio"]): e for e in result["entries"]}
    s, dense = result["setup"], result["dense"]
    head = ["| method | " + " | ".join(f"{r:g}x" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    lines = [f"Calibration: {s['calib_windows']} windows of `{s['calib']}`; held-out texts {s['eval_windows']} x "
             f"{s['seq_len']} tokens each (reporting only).", ""]
    for spec in s["eval"]:
        lines += [f"**`{spec}`** held-out PPL (dense {fmt(dense['ppl'][spec])}; in brackets: / whiten)", "", *head]
        for m in methods:
            cells = []
            for r in ratios:
                e, w = by.get((m, r)), by.get(("whiten", r))
                cell = fmt(e["ppl"][spec]) if e else "-"
                if e and w and m != "whiten":
                    cell += f" ({e['ppl'][spec] / w['ppl'][spec]:.2f})"
                cells.append(cell)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    chat = dense["chat"]
    lines += [f"**Chat fidelity**: top-1 agreement with the dense model's greedy answers to {chat['prompts']} "
              f"held-out prompts ({chat['tokens']} answer tokens); in brackets the PPL of those answers "
              f"(dense {chat['answer_ppl']:.2f})", "", *head]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(
            f"{by[(m, r)]['chat']['top1_agreement']:.1%} ({fmt(by[(m, r)]['chat']['answer_ppl'])})"
            if (m, r) in by else "-" for r in ratios) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(result, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = result["setup"]["eval"]
    fig, axes = plt.subplots(1, len(specs), figsize=(5 * len(specs), 4), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        for m in dict.fromkeys(e["method"] for e in result["entries"]):
            pts = sorted((e["ratio"], e["ppl"][spec]) for e in result["entries"] if e["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.axhline(result["dense"]["ppl"][spec], color="grey", ls="--", label="dense")
        ax.set_yscale("log")
        ax.set_title(spec)
        ax.set_xlabel("compression ratio of decoder linears")
        ax.set_ylabel("held-out PPL (log)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
