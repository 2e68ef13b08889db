"""``vac compress`` and ``vac eval``: parse, call the library, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..config import (
    DEFAULT_EVAL,
    DEFAULT_MODEL,
    CompressConfig,
    DataConfig,
    EvalConfig,
    StrategyConfig,
)
from .app import app, command_line, err, friendly, log, out
from .options import config_options


@app.command("eval")
@friendly
def eval_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="embedded name, model folder, vac checkpoint or hub id"),
    data: str = typer.Option(DEFAULT_EVAL, help="text source, e.g. austen:eval, a .txt/.jsonl file or folder"),
    seq_len: int = typer.Option(DataConfig.seq_len, help="window length in tokens"),
    windows: Optional[int] = typer.Option(EvalConfig.windows, help="number of windows (first N, non-overlapping)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
):
    """Perplexity: non-overlapping windows, all shifted tokens scored, use_cache=False."""
    from ..core.evaluate import measured_ppl
    from ..core.report import summary_table
    from ..models.zoo import load_model, resolve_model

    net, tok = load_model(model)
    result = measured_ppl(net, tok, resolve_model(model), data, seq_len, windows)
    result["model"] = model
    if as_json:
        print(json.dumps(result))
        return
    out.print(summary_table(f"perplexity of {model}", [
        ("data", data), ("protocol", f"{result['windows']} x {seq_len} tokens, non-overlapping"),
        ("tokens scored", f"{result['tokens']:,}"), ("PPL", f"{result['ppl']:.3f}"),
    ]))


@app.command()
@friendly
@config_options("strategy", StrategyConfig)
@config_options("data", DataConfig)
def compress(
    model: str = typer.Argument(DEFAULT_MODEL, help="embedded name, model folder or hub id"),
    out_dir: Path = typer.Option(..., "--out", help="checkpoint folder to write"),
    eval_data: str = typer.Option(EvalConfig.data, "--eval", help="held-out text source ('' to skip)"),
    eval_windows: int = typer.Option(EvalConfig.windows, help="evaluation windows"),
    dtype: Optional[str] = typer.Option(None, help="storage dtype of the checkpoint: fp32 | bf16 [default: the source's]"),
    stream: bool = typer.Option(True, "--stream/--in-memory", help="compress one decoder layer at a time (memory of "
                                "one layer; resumable) or load the whole model"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda[:N] for the whole compression [default: cuda when available]"),
    stats_cache: bool = typer.Option(True, "--stats-cache/--no-stats-cache",
                                     help="reuse the dense statistics of an earlier run (cached under $VAC_HOME/stats)"),
    overwrite: bool = typer.Option(False, help="replace an existing --out folder"),
    offload_dir: Optional[Path] = typer.Option(None, help="keep the calibration hidden states in files under this "
                                               "folder instead of in memory (streamed; for long calibration sets)"),
    strategy_file: Optional[Path] = typer.Option(None, "--strategy", help="strategy JSON of `vac search`: it replaces "
                                                 "every strategy option (--ratio, --method, --order, ...), not the data options"),
    *, strategy: StrategyConfig, data: DataConfig,
):
    """Compress MODEL so its decoder linears hold RATIO-times fewer parameters, and save it."""
    from ..core.report import rank_table, summary_table
    from ..core.run import compress_model
    from ..search.run import load_strategy

    if strategy_file is not None:
        strategy = load_strategy(strategy_file)
    report = compress_model(
        model, out_dir, CompressConfig(strategy, data), evaluation=EvalConfig(eval_data, eval_windows), dtype=dtype,
        device=device, stats_cache=stats_cache, overwrite=overwrite, command=command_line(), stream=stream, log=log,
        offload_dir=offload_dir,
    )
    if not report:  # a rank other than 0 under torchrun: rank 0 prints
        return
    s = CompressConfig(strategy, data).resolved().strategy
    err.print(rank_table(*report.pop("rank_rows")))
    ppl = lambda r: f"{r['ppl']:.2f}" if r else "-"  # noqa: E731
    comp = report["component_ratio"]
    p = report["decoder_linear_params"]
    out.print(summary_table(f"vac compress: {model} → {out_dir}", [
        ("method", f"{s.method} ({s.allocation}, {'sequential ' + str(s.order) if s.sequential else 'dense statistics'})"),
        ("decoder linear params", f"{p['before']:,} → {p['after']:,}"),
        ("ratio reached", f"{report['ratio_reached']:.3f}x (attn {comp['attn']:.2f}x, mlp {comp['mlp']:.2f}x)"),
        ("PPL before → after", f"{ppl(report['ppl_before'])} → {ppl(report['ppl_after'])}  ({eval_data}, "
                               f"{eval_windows}x{data.seq_len})"),
        ("time", f"{report['seconds']['total']:.0f} s"),
        ("peak RSS", f"{report['peak_rss_mb']:.0f} MB"),
    ]))


@app.command("self-text")
@friendly
def self_text_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="embedded name or model folder (an instruct/chat model)"),
    out_file: Path = typer.Option(..., "--out", help=".jsonl file to write (one {\"text\": ...} per conversation)"),
    samples: int = typer.Option(8, min=1, help="sampled answers per built-in calib prompt"),
    max_new_tokens: int = typer.Option(128, min=1, help="answer length limit in tokens"),
    seed: int = typer.Option(0, help="sampling seed"),
    overwrite: bool = typer.Option(False, help="replace an existing --out file"),
):
    """Write calibration text the dense model generates itself (its answers to the built-in calib
    prompts, chat-formatted); mix it in with --calib SPEC+FILE."""
    import shutil

    from ..atomic import check_output
    from ..data.selftext import cached_self_text
    from ..errors import VacError
    from ..models.zoo import load_model, resolve_model

    if out_file.suffix != ".jsonl":
        raise VacError(f"--out must be a .jsonl file, got {out_file}")
    if out_file.exists() and not overwrite:
        raise VacError(f"{out_file} already exists (pass --overwrite to replace it)")
    check_output(out_file, {"model": model})
    net, tok = load_model(model)
    cached = cached_self_text(net, tok, resolve_model(model), samples, max_new_tokens, seed)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    shutil.copyfile(cached, tmp)
    tmp.replace(out_file)
    lines = sum(1 for _ in cached.open())
    out.print(f"wrote {lines} conversations of {model} to {out_file}")
