"""Recovery benchmark: the embedded default compressed at 1.8x, then distilled from its dense self.

1. compress: ``vac compress smollm2-135m --ratio 1.8`` into the work folder (skipped with ``--student DIR``
   or when the work folder already holds it);
2. distill: ``vac distill`` from the dense model for at most ``--minutes`` of training (the cosine
   schedule is fitted to that budget from the times of steps 2-6, then every 24 steps); rerunning this
   script resumes it;
3. scores (reporting only, after the run): the dense, compressed and recovered models on the held-out
   texts of the quality benchmark (``REPORT_EVALS``; one protocol: the first ``--eval-windows``
   non-overlapping ``--eval-seq-len``-token windows, every shifted token scored, use_cache=False) and
   on chat fidelity (:mod:`vac.core.fidelity`), and the snapshots written every ``--snapshot-every``
   steps on the first held-out text: the recovered PPL over the training minutes;
4. writes ``benchmarks/results/recovery.json`` and ``recovery.png`` (PPL and loss over the minutes).

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


def vac_launcher(nproc: int) -> list[str]:
    """``python -m vac.cli``; for several processes under torchrun (DDP on gloo)."""
    py = sys.executable
    return [py, "-m", "vac.cli"] if nproc == 1 else [
        py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "vac.cli"]


def run(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode:
        sys.exit(f"command failed ({proc.returncode}): {shlex.join(cmd)}")


def main(argv=None):
    from vac.cache import cache_dir
    from vac.config import REPORT_EVALS, DataConfig, EvalConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="dense teacher (and model to compress)")
    ap.add_argument("--ratio", type=float, default=1.8)
    ap.add_argument("--student", type=Path, help="reuse this compressed checkpoint folder")
    ap.add_argument("--compress-args", default="", help="extra options of vac compress, one string")
    ap.add_argument("--minutes", type=float, default=60.0, help="training time budget of the distillation")
    ap.add_argument("--max-steps", type=int, default=100_000, help="upper bound on the steps")
    ap.add_argument("--eval", nargs="+", default=None, help="held-out texts, reporting only [REPORT_EVALS]; "
                    "the first is the one the distillation reports before/after and the curve uses")
    ap.add_argument("--eval-windows", type=int, default=EvalConfig.windows)
    ap.add_argument("--eval-seq-len", type=int, default=DataConfig.seq_len)
    ap.add_argument("--work", type=Path, default=None, help="folder of the checkpoints [~/.cache/vac/bench/recovery]")
    ap.add_argument("--results", type=Path, default=RESULTS / "recovery.json")
    ap.add_argument("--nproc", type=int, default=2, help="distillation processes (torchrun, DDP on gloo)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    ap.add_argument("--snapshot-every", type=int, default=25, help="steps between the curve's snapshots (0: none)")
    ap.add_argument("--no-chat", action="store_true", help="skip the chat-fidelity scores")
    args, distill_args = ap.parse_known_args(argv)
    args.eval = args.eval or list(REPORT_EVALS)
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
            run([*vac_launcher(1), "compress", args.model, "--ratio", str(args.ratio), "--out", str(student),
                 "--eval", "", "--overwrite", *shlex.split(args.compress_args)])
    elif not (student / "config.json").is_file():
        sys.exit(f"error: no checkpoint folder at {student}")

    distilled = work / f"{student.name}-distilled"
    snapshots = work / f"{student.name}-snapshots"
    eval_opts = ["--eval", args.eval[0], "--eval-windows", str(args.eval_windows),
                 "--eval-seq-len", str(args.eval_seq_len)]
    if args.snapshot_every:
        eval_opts += ["--snapshot-every", str(args.snapshot_every), "--snapshots", str(snapshots)]
    distill_cmd = [*vac_launcher(args.nproc), "distill", str(student), "--teacher", args.model,
                   "--out", str(distilled), "--max-minutes", str(args.minutes), "--steps", str(args.max_steps),
                   *eval_opts, *distill_args]
    # the work folder is reused by a rerun only for the same distillation: a finished run of other options
    # would otherwise be scored as this one
    command_file = work / f"{student.name}-distilled.command"
    if command_file.is_file() and command_file.read_text() != shlex.join(distill_cmd):
        sys.exit(f"error: {distilled} holds a distillation of another command ({command_file}); "
                 "pass another --work folder")
    if (distilled / "distill.json").is_file() and not command_file.is_file():
        sys.exit(f"error: {distilled} holds a distillation of an unknown command; pass another --work folder")
    if not (distilled / "distill.json").is_file():
        from vac.atomic import atomic_write

        atomic_write(command_file, shlex.join(distill_cmd))
        run(distill_cmd)
    report = json.loads((distilled / "distill.json").read_text())

    scores = score_all(args, student, distilled, snapshots, report)
    result = {
        "dense_ppl": scores["dense"]["ppl"][args.eval[0]],
        "compressed_ppl": report["ppl_before"]["ppl"],
        "recovered_ppl": report["ppl_after"]["ppl"],
        "minutes": report["minutes"],
        "tokens": report["tokens"],
        "steps": report["steps"],
        "protocol": f"{args.eval_windows} non-overlapping windows of {args.eval_seq_len} tokens of each held-out "
                    "text, all shifted tokens scored, use_cache=False",
        "held_out": scores,
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
    plot(result, report["loss_curve"], args.results.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("dense_ppl", "compressed_ppl", "recovered_ppl", "minutes", "tokens")},
                     indent=1))


def score_all(args, student: Path, distilled: Path, snapshots: Path, report: dict) -> dict:
    """PPL on every held-out text and chat fidelity of the dense, compressed and recovered models, and
    the PPL on the first text of every snapshot (at its training minute)."""
    from vac import checkpoint
    from vac.core.evaluate import perplexity
    from vac.core.fidelity import chat_fidelity, reference_answers
    from vac.data.prompts import prompts
    from vac.data.windows import eval_windows
    from vac.models.zoo import load_model, resolve_model
    from vac.recover.distill import load_snapshot

    dense, tok = load_model(args.model)
    windows = {spec: eval_windows(tok, spec, args.eval_seq_len, args.eval_windows) for spec in args.eval}
    refs = None if args.no_chat else reference_answers(dense, tok, prompts("eval"), source=resolve_model(args.model))

    def scores(net) -> dict:
        return {"ppl": {spec: perplexity(net, w, progress=False)["ppl"] for spec, w in windows.items()},
                "chat": None if refs is None else chat_fidelity(net, refs)}

    out = {"dense": scores(dense)}
    del dense
    out["recovered"] = scores(checkpoint.load(distilled)[0])
    net = checkpoint.load(student)[0]  # scored as it is, then carrying each snapshot's parameters
    out["compressed"] = scores(net)
    seconds = {h["step"]: h["seconds"] for h in report["loss_curve"]}
    curve = [{"step": 0, "minutes": 0.0, "ppl": out["compressed"]["ppl"][args.eval[0]]}]
    for path in sorted(snapshots.glob("step-*.safetensors")) if snapshots.is_dir() else []:
        step = load_snapshot(net, path)
        if step in seconds:
            curve.append({"step": step, "minutes": seconds[step] / 60,
                          "ppl": perplexity(net, windows[args.eval[0]], progress=False)["ppl"]})
    curve.append({"step": report["steps"], "minutes": report["minutes"], "ppl": out["recovered"]["ppl"][args.eval[0]]})
    out["curve"] = {"data": args.eval[0], "points": curve}
    return out


def plot(result: dict, loss_curve: list[dict], path: Path) -> None:
    """The recovered PPL (first held-out text) and the training loss over the training minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vac.atomic import atomic_write

    curve = result["held_out"]["curve"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot([p["minutes"] for p in curve["points"]], [p["ppl"] for p in curve["points"]], "o-", label="recovered")
    left.axhline(result["dense_ppl"], color="k", ls="--", lw=1, label="dense")
    left.axhline(1.5 * result["dense_ppl"], color="g", ls=":", lw=1, label="1.5x dense")
    left.set(xlabel="training minutes", ylabel=f"PPL ({curve['data']})", yscale="log", title="held-out PPL")
    left.legend()
    right.plot([h["seconds"] / 60 for h in loss_curve], [h["loss"] for h in loss_curve], lw=1)
    right.set(xlabel="training minutes", ylabel="loss", title="distillation loss")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
