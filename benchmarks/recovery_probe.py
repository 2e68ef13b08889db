"""Which distillation recipe should be `vac distill`'s default? Decided on the search splits only.

Each candidate (options of ``vac distill`` over its defaults, e.g. ``{"lr": 3e-4}``) distills the given
1.8x student from the dense embedded default for the same short training budget (``--minutes``, the
cosine schedule fitted to it, or the same number of ``--steps``), two gloo processes of one thread as
benchmarks/recovery.py runs them.
The distilled model is scored as benchmarks/strategy_probe.py scores a compression
(:class:`vac.search.decide.Decision`): PPL on the search split of every text in ``DECISION_TEXTS`` and
chat fidelity on the ``search`` prompts; figure of merit the geometric mean of the PPL ratios
distilled/dense. The distillation itself reports on no text (``--eval ''``). No evaluation split is read.
Results → results/recovery_probe.json (resumable: one entry per candidate, a stopped distillation resumes).

    .venv/bin/python benchmarks/recovery_probe.py --student runs/smollm2-1.8x --minutes 10 \\
        --candidates '{}' '{"lr": 3e-4}' -- --data web-bible:calib+shakespeare:calib+handbook:calib+austen:calib
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from recovery import run, vac_launcher  # benchmarks/recovery.py: the same launcher and command runner
from vac.config import DEFAULT_MODEL, DistillConfig
from vac.search.decide import Decision

RESULTS = Path(__file__).parent / "results" / "recovery_probe.json"


def flags(settings: dict) -> list[str]:
    """``{"lr": 3e-4, "train_norms": true}`` → ``--lr 0.0003 --train-norms`` (vac distill's options;
    its switches are off by default, so ``false`` adds nothing)."""
    out = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else []
        else:
            out += [flag, str(value)]
    return out


def main(argv=None):
    from vac.cache import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, required=True, help="the compressed checkpoint folder to distill")
    ap.add_argument("--candidates", nargs="+", type=json.loads, default=[{}],
                    help="vac distill options as JSON objects ({} = its defaults)")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=10.0, help="training time budget of each candidate")
    budget.add_argument("--steps", type=int, default=None,
                        help="a fixed number of steps per candidate instead of --minutes (the same schedule "
                        "for every candidate however busy the machine is)")
    ap.add_argument("--windows", type=int, default=20, help="search windows per text (512 tokens)")
    ap.add_argument("--nproc", type=int, default=2, help="distillation processes (torchrun, DDP on gloo)")
    ap.add_argument("--work", type=Path, default=None, help="folder of the runs [~/.cache/vac/bench/recovery_probe]")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("rest", nargs="*", help="after --: options passed to every vac distill (e.g. --data SPEC)")
    args = ap.parse_args(argv)
    if not (args.student / "config.json").is_file():
        sys.exit(f"error: no checkpoint folder at {args.student}")
    work = args.work or cache_dir() / "bench" / "recovery_probe"
    os.environ["OMP_NUM_THREADS"] = "1"  # for the subprocesses, as in benchmarks/recovery.py
    import torch

    from vac import checkpoint

    torch.set_num_threads(2)
    decision = Decision(args.results, args.windows, ratio=None)
    defaults = asdict(DistillConfig())
    budget = ["--steps", str(args.steps)] if args.steps else ["--max-minutes", str(args.minutes), "--steps", "100000"]
    common = ["--teacher", DEFAULT_MODEL, *budget, "--eval", "", *args.rest]
    for settings in args.candidates:
        # the defaults a candidate's options apply over are part of it: `{}` after a default changed is
        # another candidate
        key = json.dumps({"student": str(args.student), "options": flags(settings) + common, "defaults": defaults})
        if key in decision.entries:
            continue
        out = work / hashlib.sha256(key.encode()).hexdigest()[:16]
        cmd = [*vac_launcher(args.nproc), "distill", str(args.student), "--out", str(out), *flags(settings), *common]
        if not (out / "distill.json").is_file():
            run(cmd)
        report = json.loads((out / "distill.json").read_text())
        decision.score(key, checkpoint.load(out)[0], settings=settings, defaults=defaults, command=shlex.join(cmd),
                       minutes=report["minutes"], steps=report["steps"], tokens=report["tokens"])
    table(decision.doc)


def table(doc: dict) -> None:
    best = min(doc["entries"], key=lambda k: doc["entries"][k]["geomean_ratio"])
    print(f"{'candidate':40s} {'steps':>5s} {'min':>5s}  " + "  ".join(f"{t:>15s}" for t in doc["setup"]["texts"])
          + "  geomean  chat top-1")
    for key, e in doc["entries"].items():
        print(f"{json.dumps(e['settings']):40s} {e['steps']:5d} {e['minutes']:5.1f}  "
              + "  ".join(f"{e['ppl'][t]:15.2f}" for t in doc["setup"]["texts"])
              + f"  {e['geomean_ratio']:7.3f}  {e['chat']['top1_agreement']:9.1%}" + ("  best" if key == best else ""))


if __name__ == "__main__":
    main()
