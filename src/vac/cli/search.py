"""``vac search``: evolutionary strategy search at a fixed budget (and ``--ablation``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import DEFAULT_MODEL, DataConfig, EvalConfig, StrategyConfig
from ..errors import VacError
from ..search.space import DATA_FIELDS, SearchSetup
from .app import app, err, friendly, out
from .options import config_options


@app.command()
@friendly
@config_options("data", DataConfig, exclude=[f for f in DataConfig.__dataclass_fields__ if f not in DATA_FIELDS])
def search(
    model: str = typer.Argument(DEFAULT_MODEL, help="embedded name, model folder or hub id"),
    ratio: float = typer.Option(StrategyConfig.ratio, help="parameter reduction of the decoder linears (> 1), met exactly"),
    out_dir: Path = typer.Option(..., "--out", help="output folder (state, caches, results); rerun to resume"),
    generations: int = typer.Option(10, help="generations to run (rerun with more to continue)"),
    population: int = typer.Option(SearchSetup.population, help="genomes per generation"),
    seed: int = typer.Option(SearchSetup.seed, help="seed of the search (calibration sampling uses seed 0, as vac compress)"),
    budget_minutes: Optional[float] = typer.Option(None, help="stop between generations so that the whole run, "
                                                   "final re-scoring included, fits in this many minutes"),
    search_data: str = typer.Option(SearchSetup.search_data, help="fitness text source (disjoint from --calib and --eval)"),
    search_windows: int = typer.Option(SearchSetup.search_windows, help="fitness windows (first N, non-overlapping)"),
    eval_data: str = typer.Option(EvalConfig.data, "--eval", help="held-out source, scored once for the winner "
                                  "('' to skip)"),
    eval_windows: int = typer.Option(EvalConfig.windows, help="evaluation windows"),
    top_k: int = typer.Option(SearchSetup.top_k, help="proxy-best genomes re-scored with the full (sequential) config"),
    proxy: bool = typer.Option(True, "--proxy/--no-proxy", help="score candidates by a proxy (--proxy-score), "
                               "the top-k fully at the end; --no-proxy: every candidate fully"),
    order_windows: Optional[int] = typer.Option(None, help="calibration windows of the short sequential "
                                                "compressions that score each genome (--proxy-score short) or "
                                                "each layer order (truncation; 0: blind to the order) [default: 8]"),
    order_seq_len: int = typer.Option(SearchSetup.order_seq_len, help="window length of the short compressions"),
    order_refine_steps: Optional[int] = typer.Option(SearchSetup.order_refine_steps, help="refinement steps per "
                                                     "layer of the short compressions"),
    proxy_score: str = typer.Option(SearchSetup.proxy_score, help="a genome's proxy fitness: short, its own short "
                                    "sequential compression with refinement (minutes each); truncation: cached "
                                    "factors, no sequential pass (seconds), times its order's short score"),
    rank_step: int = typer.Option(StrategyConfig.rank_step, help="rank grid step of the allocation"),
    rank_floor: int = typer.Option(StrategyConfig.rank_floor, help="smallest rank a matrix can get"),
    workers: int = typer.Option(1, help="worker processes scoring candidates in parallel (proxy scoring)"),
    streamed: bool = typer.Option(SearchSetup.streamed, "--streamed/--in-memory",
                                  help="memory bounded by one decoder layer (statistics and factors per layer on "
                                       "disk, a generation scored in one pass over the layers, orders and full "
                                       "re-scores by streamed compressions); --in-memory loads the whole model"),
    ablation: bool = typer.Option(False, "--ablation", help="instead of searching: the default with one setting "
                                  "changed (order, Fisher exponent, allocation), scored on search and eval"),
    *, data: DataConfig,
):
    """Search compression strategies for MODEL at --ratio; write the best as OUT/strategy.json."""
    from ..core.report import summary_table
    from ..search.ablation import ablation_table, run_ablation
    from ..search.run import run_search, top_table

    setup = SearchSetup(
        model=model, ratio=ratio, population=population, seed=seed, search_data=search_data,
        search_windows=search_windows, eval_data=eval_data, eval_windows=eval_windows, rank_step=rank_step,
        rank_floor=rank_floor, top_k=top_k, proxy=proxy, streamed=streamed, order_windows=order_windows,
        order_seq_len=order_seq_len, order_refine_steps=order_refine_steps, proxy_score=proxy_score,
        **{k: getattr(data, k) for k in DATA_FIELDS},
    )
    log = lambda msg: err.print(msg, highlight=False)  # noqa: E731
    if ablation and streamed:
        raise VacError("--ablation runs in memory (it compresses the default with other orders); drop --streamed")
    if ablation:
        doc = run_ablation(setup, out_dir, log=log)
        out.print(ablation_table(doc))
        out.print(f"[dim]{doc['protocol']}[/dim]")
        out.print(f"written: {out_dir / 'ablation.json'}, {out_dir / 'ablation.md'}", soft_wrap=True)
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
        ("layer orders scored", f"{len(summary['orders'])}" + (f", best: {summary['orders'][0]['order']} "
                                f"({summary['orders'][0]['score']:.3f})" if summary["orders"] else "")),
        ("time", f"{summary['minutes']:.1f} min"),
    ]))
    # soft_wrap: a path and a command to copy stay whole at any terminal width
    out.print(f"strategy: {out_dir / 'strategy.json'}   use: {summary['reproduce']}", soft_wrap=True)
