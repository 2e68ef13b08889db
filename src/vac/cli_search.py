"""``vac search``: evolutionary strategy search at a fixed budget (and ``--ablation``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli import app, err, friendly, out
from .data import DEFAULT_CALIB, DEFAULT_EVAL, DEFAULT_SEARCH


@app.command()
@friendly
def search(
    model: str = typer.Argument("smollm2-135m", help="embedded name, model folder or hub id"),
    ratio: float = typer.Option(1.8, help="parameter reduction of the decoder linears (> 1), met exactly"),
    out_dir: Path = typer.Option(..., "--out", help="output folder (state, caches, results); rerun to resume"),
    generations: int = typer.Option(10, help="generations to run (rerun with more to continue)"),
    population: int = typer.Option(8, help="genomes per generation"),
    seed: int = typer.Option(0, help="seed of the search (calibration sampling uses seed 0, as vac compress)"),
    budget_minutes: Optional[float] = typer.Option(None, help="stop between generations so that the whole run, "
                                                   "final re-scoring included, fits in this many minutes"),
    search_data: str = typer.Option(DEFAULT_SEARCH, help="fitness text source (disjoint from --calib and --eval)"),
    search_windows: int = typer.Option(8, help="fitness windows (first N, non-overlapping)"),
    seq_len: int = typer.Option(512, help="window length for calibration, search and evaluation"),
    calib: str = typer.Option(DEFAULT_CALIB, help="calibration text source"),
    calib_windows: int = typer.Option(64, help="calibration windows"),
    fisher_windows: int = typer.Option(16, help="windows for the Fisher backward passes"),
    eval_data: str = typer.Option(DEFAULT_EVAL, "--eval", help="held-out source, scored once for the winner "
                                  "('' to skip)"),
    eval_windows: int = typer.Option(40, help="evaluation windows"),
    top_k: int = typer.Option(3, help="proxy-best genomes re-scored with the full (sequential) config"),
    proxy: bool = typer.Option(True, "--proxy/--no-proxy", help="score candidates non-sequentially from cached "
                               "factors (fast), the top-k fully at the end; --no-proxy: every candidate fully"),
    rank_step: int = typer.Option(8, help="rank grid step of the allocation"),
    rank_floor: int = typer.Option(8, help="smallest rank a matrix can get"),
    workers: int = typer.Option(1, help="worker processes scoring candidates in parallel (proxy scoring)"),
    ablation: bool = typer.Option(False, "--ablation", help="instead of searching: the default with one setting "
                                  "changed (order, Fisher exponent, allocation), scored on search and eval"),
):
    """Search compression strategies for MODEL at --ratio; write the best as OUT/strategy.json."""
    from .ablation import ablation_table, run_ablation
    from .report import summary_table
    from .search import SearchSetup, run_search, top_table

    setup = SearchSetup(
        model=model, ratio=ratio, population=population, seed=seed, search_data=search_data,
        search_windows=search_windows, eval_data=eval_data, eval_windows=eval_windows, calib=calib,
        calib_windows=calib_windows, fisher_windows=fisher_windows, seq_len=seq_len, rank_step=rank_step,
        rank_floor=rank_floor, top_k=top_k, proxy=proxy,
    )
    log = lambda msg: err.print(msg, highlight=False)  # noqa: E731
    if ablation:
        doc = run_ablation(setup, out_dir, log=log)
        out.print(ablation_table(doc))
        out.print(f"[dim]{doc['protocol']}[/dim]")
        out.print(f"written: {out_dir / 'ablation.json'}, {out_dir / 'ablation.md'}")
        return
    summary = run_search(setup, out_dir, generations, budget_minutes, workers, log=log)
    out.print(top_table(summary))
    w, d = summary["winner"], summary["default"]
    ppl = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    out.print(summary_table(f"vac search: {model} at {ratio:g}x → {out_dir}", [
        ("winner", ", ".join(f"{k} {v}" for k, v in w["describe"].items()) + (" (the default)" if w["is_default"] else "")),
        ("ratio reached", f"{w['ratio_reached']:.3f}x"),
        ("search PPL default → winner", f"{ppl(d['search_ppl'])} → {ppl(w['search_ppl'])}  ({search_data})"),
        ("eval PPL default → winner", f"{ppl(d['eval_ppl'])} → {ppl(w['eval_ppl'])}  ({eval_data or 'skipped'})"),
        ("generations", f"{summary['generations_done']} ({summary['stopped']}), {summary['evaluated']} genomes scored"),
        ("time", f"{summary['minutes']:.1f} min"),
    ]))
    out.print(f"strategy: {out_dir / 'strategy.json'}   use: {summary['reproduce']}")
