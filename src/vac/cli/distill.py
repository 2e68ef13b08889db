"""``vac distill``: recover a compressed checkpoint by distillation from its dense teacher.

Runs as one process, or data-parallel under torchrun::

    torchrun --nproc_per_node 2 -m vac.cli distill STUDENT --teacher MODEL --out DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..atomic import check_output
from ..config import (
    DEFAULT_CALIB,
    DEFAULT_EVAL,
    DISTILL_CHAT_FRACTION,
    DISTILL_CHAT_SAMPLES,
    DataConfig,
    DistillConfig,
    EvalConfig,
)
from ..errors import VacError
from .app import app, err, friendly, out


@app.command()
@friendly
def distill(
    student_dir: Path = typer.Argument(..., help="vac checkpoint folder to recover (the student)"),
    teacher: Optional[str] = typer.Option(None, help="dense teacher: embedded name, folder or hub id "
                                          "[default: the model named in the student's report.json]"),
    data: str = typer.Option(DEFAULT_CALIB, help="training text source (never the evaluation split)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="checkpoint folder to write (rerun to resume)"),
    steps: int = typer.Option(DistillConfig.steps, help="optimizer steps (upper bound with --max-minutes)"),
    seq_len: int = typer.Option(DistillConfig.seq_len, help="training window length in tokens"),
    batch_size: int = typer.Option(DistillConfig.batch_size, help="global batch in sequences per optimizer step (all processes)"),
    grad_accum: int = typer.Option(DistillConfig.grad_accum, help="micro-batches per process per step"),
    lr: float = typer.Option(DistillConfig.lr, help="learning rate of the MLP linears (base lr)"),
    attn_lr_mult: float = typer.Option(DistillConfig.attn_lr_mult, help="attention linears train at this multiple of --lr"),
    warmup: int = typer.Option(DistillConfig.warmup, help="linear warmup steps before the cosine decay"),
    min_lr_ratio: float = typer.Option(DistillConfig.min_lr_ratio, help="final lr of the cosine as a fraction of the peak"),
    weight_decay: float = typer.Option(DistillConfig.weight_decay, help="AdamW weight decay on linear weights"),
    clip: float = typer.Option(DistillConfig.clip, help="max global gradient norm (0: off)"),
    temperature: float = typer.Option(DistillConfig.temperature, "--temperature", "-T", help="distillation temperature T"),
    alpha: float = typer.Option(DistillConfig.alpha, help="loss = alpha*T^2*KL + (1-alpha)*NLL (per-token means)"),
    chat_fraction: float = typer.Option(DISTILL_CHAT_FRACTION, help="fraction of chat-formatted samples in the mix"),
    chat_data: Optional[Path] = typer.Option(None, help='jsonl of {"messages": [...]} or rendered {"text": ...} '
                                            '(vac self-text) [default: built from --data]'),
    chat_samples: int = typer.Option(DISTILL_CHAT_SAMPLES, help="size of the built-in chat set"),
    train_norms: bool = typer.Option(DistillConfig.train_norms, "--train-norms/--freeze-norms", help="train the norm weights"),
    train_embeddings: bool = typer.Option(DistillConfig.train_embeddings, "--train-embeddings/--freeze-embeddings",
                                          help="train the embeddings and a dense lm_head"),
    teacher_cache: Optional[Path] = typer.Option(None, help="folder of cached top-k teacher logits "
                                                 "(KL on the renormalized top-k support)"),
    top_k: int = typer.Option(DistillConfig.top_k, help="teacher logits kept per position in --teacher-cache"),
    cache_teacher_only: bool = typer.Option(False, "--cache-teacher-only", help="only run the teacher over the "
                                            "batches of this run and write --teacher-cache, then exit"),
    save_every: int = typer.Option(DistillConfig.save_every, help="save a resumable state every N steps"),
    snapshot_every: int = typer.Option(DistillConfig.snapshot_every, help="write the trainable parameters every N steps to --snapshots "
                                       "(quality over the run, scored afterwards; 0: never)"),
    snapshots: Optional[Path] = typer.Option(None, help="folder of the --snapshot-every files (outside --out)"),
    max_minutes: Optional[float] = typer.Option(DistillConfig.max_minutes, help="training time budget; the schedule is fitted to "
                                                "it from steps 2-6 of the run, then every 24 steps from the pace since"),
    fsdp: bool = typer.Option(DistillConfig.fsdp, help="shard the student and the teacher with FSDP2 (each decoder layer, then "
                              "the root); torchrun only"),
    bf16: bool = typer.Option(DistillConfig.bf16, help="bfloat16 compute, fp32 master weights (with --fsdp: FSDP2's "
                              "MixedPrecisionPolicy, fp32 gradient reduction; otherwise autocast); GPUs"),
    grad_checkpoint: bool = typer.Option(DistillConfig.grad_checkpoint, "--grad-checkpoint", help="recompute each decoder layer in the "
                                         "backward (activation checkpointing): less memory, ~1/3 more compute"),
    loss_chunk: int = typer.Option(DistillConfig.loss_chunk, help="scored tokens per chunk of the KL/NLL: the LM "
                                   "head is applied a chunk at a time (memory, not results)"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda [default: cuda when available]"),
    seed: int = typer.Option(DistillConfig.seed, help="data order seed"),
    eval_data: str = typer.Option(DEFAULT_EVAL, "--eval", help="held-out text for PPL before/after ('' to skip)"),
    eval_seq_len: int = typer.Option(DataConfig.seq_len, help="evaluation window length"),
    eval_windows: int = typer.Option(EvalConfig.windows, help="evaluation windows"),
    overwrite: bool = typer.Option(False, help="start over even if --out holds a run"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the memory per rank of this run on 1, 2, 4 and 8 "
                                 "processes (from the configurations, nothing loaded) and exit"),
):
    """Distill TEACHER into the factorized STUDENT_DIR on --data; writes a vac checkpoint to --out."""
    import torch

    from .. import checkpoint
    from ..core.report import summary_table
    from ..data.windows import eval_windows as protocol_windows
    from ..models.zoo import hub_snapshot, load_model, resolve_model
    from ..recover.data import build_mix, check_no_overlap
    from ..recover.distill import (
        copy_reports,
        fill_teacher_cache,
        init_distributed,
        run_distill,
    )

    cfg = DistillConfig(
        steps=steps, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        attn_lr_mult=attn_lr_mult, warmup=warmup, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
        clip=clip, temperature=temperature, alpha=alpha, train_norms=train_norms,
        train_embeddings=train_embeddings, top_k=top_k, seed=seed, save_every=save_every,
        max_minutes=max_minutes, fsdp=fsdp, bf16=bf16, grad_checkpoint=grad_checkpoint, loss_chunk=loss_chunk,
        snapshot_every=snapshot_every,
    )
    cfg.check()
    if not (student_dir / "config.json").is_file():
        raise VacError(f"no checkpoint folder at {student_dir} (no config.json)")
    if cache_teacher_only and teacher_cache is None:
        raise VacError("--cache-teacher-only needs --teacher-cache DIR to write to")
    if out_dir is None and not cache_teacher_only and not dry_run:
        raise VacError("--out DIR is needed (the checkpoint folder to write)")
    if out_dir is not None:
        check_output(out_dir, {"student": student_dir, "teacher": teacher, "training data": data,
                               "chat data": chat_data, "teacher cache": teacher_cache, "evaluation data": eval_data})
    if teacher_cache is not None:
        check_output(teacher_cache, {"student": student_dir, "teacher": teacher, "training data": data,
                                     "chat data": chat_data})
    if chat_data is not None and not chat_data.is_file():
        raise VacError(f"no such chat file: {chat_data}")
    check_no_overlap(data, eval_data)
    reports = copy_reports(student_dir)
    if teacher is None:
        teacher = (reports.get("report.json") or {}).get("model")
        if not teacher:
            raise VacError(f"{student_dir} names no teacher model (no report.json); pass --teacher")
    teacher_source = resolve_model(teacher)
    if dry_run:
        _print_plan(student_dir, teacher_source, cfg, cached=teacher_cache is not None)
        return

    env = init_distributed(device)
    sharded = fsdp and env.on  # built on meta, each rank loads only its shards (vac.recover.sharded)
    teacher_dtype = torch.bfloat16 if bf16 else torch.float32  # the teacher needs no fp32 master weights
    if sharded:
        from transformers import AutoTokenizer

        from ..recover.distill import shard_model
        from ..recover.sharded import load_sharded

        student = student_dir
        tok = AutoTokenizer.from_pretrained(student_dir) if checkpoint._has_tokenizer(student_dir) else None
        teacher_folder = teacher_source if Path(teacher_source).is_dir() else hub_snapshot(teacher_source)
        load_teacher = lambda: load_sharded(teacher_folder, lambda m: shard_model(m, cfg), env.device,  # noqa: E731
                                            frozen=True, dtype=teacher_dtype)
    else:
        student, tok = checkpoint.load(student_dir)
        load_teacher = lambda: load_model(teacher, dtype=teacher_dtype)[0]  # noqa: E731
    if tok is None:
        raise VacError(f"{student_dir} has no tokenizer")
    stored = json.loads((student_dir / "config.json").read_text()).get("dtype")
    save_dtype = torch.bfloat16 if stored == "bfloat16" else None
    mix = build_mix(tok, data, seq_len, chat_fraction, str(chat_data) if chat_data else None, chat_samples, seed)
    if cache_teacher_only:
        done = fill_teacher_cache(lambda: load_model(teacher)[0], mix, cfg, teacher_cache, teacher_id=teacher_source,
                                  env=env)
        if env.main:
            out.print(summary_table(f"vac distill --cache-teacher-only: {teacher} → {teacher_cache}", [
                ("batches", f"{cfg.steps} steps × {batch_size} samples × {seq_len} tokens"),
                ("entries", f"{done['written']} written, {done['already_cached']} already cached (top-{top_k})"),
                ("time", f"{done['seconds']:.1f} s"),
            ]))
        return
    windows = protocol_windows(tok, eval_data, eval_seq_len, eval_windows) if eval_data else None
    run_info = {
        "student": str(student_dir), "teacher": teacher, "data": data,
        "chat": str(chat_data) if chat_data else (f"built-in from {data}" if chat_fraction else None),
        "eval": eval_data or None,
        "protocol": f"{eval_windows} non-overlapping windows of {eval_seq_len} tokens of {eval_data}, "
                    "all shifted tokens scored, use_cache=False" if eval_data else None,
        "command": " ".join(["vac"] + sys.argv[1:]),
    }
    result = run_distill(
        student, None if teacher_cache else load_teacher, mix, cfg, out_dir, tokenizer=tok,
        eval_windows=windows,
        teacher_cache=teacher_cache, teacher_id=teacher_source, run_info=run_info, overwrite=overwrite,
        save_dtype=save_dtype, extra_files=reports, env=env, snapshots=snapshots,
    )
    if not env.main:
        return
    r = result.report
    ppl = lambda p: f"{p['ppl']:.2f}" if p else "-"  # noqa: E731
    last = r["loss_curve"][-1] if r["loss_curve"] else None
    out.print(summary_table(f"vac distill: {student_dir} → {out_dir}", [
        ("teacher", teacher),
        ("data", f"{data} + {r['mix']['chat_fraction']:.0%} chat ({r['mix']['text_windows']} windows, "
                 f"{r['mix']['chat_samples']} chats)"),
        ("steps × batch × seq", f"{r['steps']} × {batch_size} × {seq_len}  ({env.world} process(es))"),
        ("tokens", f"{r['tokens']:,}  ({r['tokens_per_second'] or 0:.0f}/s)"),
        ("final loss (KL, NLL)", f"{last['loss']:.4f} ({last['kl']:.4f}, {last['nll']:.4f})" if last else "-"),
        ("PPL before → after", f"{ppl(r['ppl_before'])} → {ppl(r['ppl_after'])}"
                               + (f"  ({eval_data}, {eval_windows}x{eval_seq_len})" if eval_data else "")),
        ("time", f"{r['minutes']:.1f} min training"),
    ]))
    err.print(f"wrote {out_dir} (distill.json, loss.png)", highlight=False)


def _print_plan(student_dir: Path, teacher_source: str, cfg, cached: bool) -> None:
    from rich.table import Table
    from transformers import AutoConfig

    from ..core.memory import human
    from ..recover.memory import distill_plan

    teacher_config = None if cached else AutoConfig.from_pretrained(teacher_source)
    rows = distill_plan(AutoConfig.from_pretrained(student_dir), teacher_config, cfg, cached_teacher=cached)
    keys = [k for k in rows[0]["bytes"] if k != "peak"]
    table = Table(title=f"vac distill --dry-run: memory per rank ({'FSDP2' if cfg.fsdp else 'replicated'}, "
                        f"{'bf16' if cfg.bf16 else 'fp32'}{', checkpointed' if cfg.grad_checkpoint else ''}, "
                        f"seq {cfg.seq_len}, global batch {cfg.batch_size}, teacher "
                        f"{'from the top-k cache' if cached else 'loaded'})", show_edge=False)
    for col in ["ranks", "micro-batch", *keys, "per rank"]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["ranks"]), str(r["micro_batch"]), *[human(r["bytes"][k]) for k in keys],
                      human(r["bytes"]["peak"]))
    out.print(table)
    out.print("[dim]vac.recover.memory: estimates without allocator slack and the CUDA context; several ranks "
              "shard only with --fsdp[/dim]")

