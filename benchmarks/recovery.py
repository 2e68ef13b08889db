"""Recovery benchmark: the embedded default compressed at 1.8x, then distilled from its dense self.

1. compress: ``vac compress smollm2-135m --ratio 1.8`` into the work folder (skipped with ``--student DIR``
   or when the work folder already holds it);
2. distill: ``vac distill`` from the dense model for at most ``--minutes`` of training (the cosine
   schedule is fitted to that budget after 5 steps); rerunning this script resumes it;
3. writes ``benchmarks/results/recovery.json``: dense_ppl, compressed_ppl, recovered_ppl (one protocol:
   the first ``--eval-windows`` non-overlapping ``--eval-seq-len``-token windows of ``austen:eval``, every
   shifted token scored, use_cache=False), minutes (training time), tokens (trained tokens).

    .venv/bin/python benchmarks/recovery.py                      # full run: 60 training minutes
    .venv/bin/python benchmarks/recovery.py --minutes 2 ...      # a quick end-to-end check

Two cores are used as two torchrun processes (DDP on gloo) of one thread each (``--nproc 2 --threads 1``):
on a shared machine one OpenMP thread per process measured 5-10x faster per step than one process with
two threads. Options not listed below are passed on to ``vac distill`` (e.g. ``--lr 5e-5 --alpha 0.7``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode:
        sys.exit(f"command failed ({proc.returncode}): {shlex.join(cmd)}")


def main(argv=None):
    from vac.cache import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="dense teacher (and model to compress)")
    ap.add_argument("--ratio", type=float, default=1.8)
    ap.add_argument("--student", type=Path, help="reuse this compressed checkpoint folder")
    ap.add_argument("--compress-args", default="", help="extra options of vac compress, one string")
    ap.add_argument("--minutes", type=float, default=60.0, help="training time budget of the distillation")
    ap.add_argument("--max-steps", type=int, default=100_000, help="upper bound on the steps")
    ap.add_argument("--eval", default="austen:eval")
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--work", type=Path, default=None, help="folder of the checkpoints [~/.cache/vac/bench/recovery]")
    ap.add_argument("--results", type=Path, default=RESULTS / "recovery.json")
    ap.add_argument("--nproc", type=int, default=2, help="distillation processes (torchrun, DDP on gloo)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    args, distill_args = ap.parse_known_args(argv)
    work = args.work or cache_dir() / "bench" / "recovery"
    py = sys.executable
    started = time.perf_counter()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the subprocesses
    import torch

    torch.set_num_threads(args.threads)

    student = args.student
    if student is None:
        student = work / f"compressed-{args.ratio:g}x"
        if not (student / "config.json").is_file():
            run([py, "-m", "vac.cli", "compress", args.model, "--ratio", str(args.ratio), "--out", str(student),
                 "--eval", "", "--overwrite", *shlex.split(args.compress_args)])
    elif not (student / "config.json").is_file():
        sys.exit(f"error: no checkpoint folder at {student}")

    distilled = work / f"{student.name}-distilled"
    eval_opts = ["--eval", args.eval, "--eval-windows", str(args.eval_windows),
                 "--eval-seq-len", str(args.eval_seq_len)]
    launcher = [py, "-m", "vac.cli"] if args.nproc == 1 else [
        py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc), "-m", "vac.cli"]
    distill_cmd = [*launcher, "distill", str(student), "--teacher", args.model,
                   "--out", str(distilled), "--max-minutes", str(args.minutes), "--steps", str(args.max_steps),
                   *eval_opts, *distill_args]
    if not (distilled / "distill.json").is_file():
        run(distill_cmd)
    report = json.loads((distilled / "distill.json").read_text())

    dense = dense_ppl(args)
    result = {
        "dense_ppl": dense["ppl"],
        "compressed_ppl": report["ppl_before"]["ppl"],
        "recovered_ppl": report["ppl_after"]["ppl"],
        "minutes": report["minutes"],
        "tokens": report["tokens"],
        "steps": report["steps"],
        "protocol": f"{args.eval_windows} non-overlapping windows of {args.eval_seq_len} tokens of {args.eval}, "
                    "all shifted tokens scored, use_cache=False",
        "model": args.model,
        "ratio": args.ratio,
        "student": str(student),
        "distilled": str(distilled),
        "distill_config": report["config"],
        "data": report.get("data"),
        "mix": report.get("mix"),
        "tokens_per_second": report.get("tokens_per_second"),
        "processes": args.nproc,
        "threads_per_process": args.threads,
        "command": shlex.join([py, *sys.argv]) if argv is None else shlex.join(["benchmarks/recovery.py", *argv]),
        "distill_command": shlex.join(distill_cmd),
        "wall_minutes_this_invocation": (time.perf_counter() - started) / 60,
    }
    from vac.atomic import write_json

    write_json(args.results, result, indent=2)
    print(json.dumps({k: result[k] for k in ("dense_ppl", "compressed_ppl", "recovered_ppl", "minutes", "tokens")},
                     indent=1))


def dense_ppl(args) -> dict:
    """PPL of the dense model under the same protocol (cached on disk per model folder)."""
    from vac.core.evaluate import measured_ppl
    from vac.models.zoo import load_model, resolve_model

    model, tok = load_model(args.model)
    return measured_ppl(model, tok, resolve_model(args.model), args.eval, args.eval_seq_len, args.eval_windows,
                        cache=True)


if __name__ == "__main__":
    main()
