"""The ablation study of ``vac search --ablation``: the default strategy with one setting changed.

The kind of study VAC published, on any model: layer order (front-to-back, back-to-front,
middle-out), Fisher exponent (1/4 … 1), allocation within a component (depth, uniform, global
knapsack) and the attention/MLP budget split, each compressed with the full (sequential) config from
the same dense statistics as the search (``OUT/cache``) and scored on the search and eval splits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from ..atomic import atomic_write, check_output, write_json
from ..cache import load_entry
from ..config import CompressConfig, StrategyConfig, attn_ratio_of
from ..core.allocate import matrices_of, reached_ratios
from ..core.driver import check_budget
from ..core.evaluate import perplexity
from ..data.windows import eval_windows, sample_windows
from ..errors import VacError
from ..models.families import arch_for
from ..models.layers import applied
from ..models.zoo import resolve_model
from .run import log_stderr
from .scoring import full_compress, search_statistics
from .space import VAC_ATTN_SHARE, SearchSetup, check_sources, max_step


def ablation_rows(ratio: float) -> list[tuple[str, str, dict]]:
    """(study, setting, StrategyConfig overrides of the default): VAC's published kind of ablation."""
    return [
        ("order", "front-to-back", {"order": "front-to-back"}), ("order", "back-to-front", {"order": "back-to-front"}),
        ("order", "middle-out", {"order": "middle-out"}),
        ("exponent", "1/4", {"fisher_exponent": 0.25}), ("exponent", "1/3", {"fisher_exponent": 1 / 3}), ("exponent", "1/2", {"fisher_exponent": 0.5}),
        ("exponent", "2/3", {"fisher_exponent": 2 / 3}), ("exponent", "1", {"fisher_exponent": 1.0}),
        ("allocation", "depth", {"allocation": "depth"}), ("allocation", "uniform", {"allocation": "uniform"}),
        ("allocation", "global knapsack", {"allocation": "global"}),
        ("split", f"attention {attn_ratio_of(ratio, VAC_ATTN_SHARE):.2f}x", {"attn_ratio": attn_ratio_of(ratio, VAC_ATTN_SHARE)}),
        ("split", "none", {"attn_ratio": ratio}),
        ("split", f"attention lighter ({attn_ratio_of(ratio, 0.5):.2f}x)", {"attn_ratio": attn_ratio_of(ratio, 0.5)}),
    ]


def run_ablation(setup: SearchSetup, out: Path | str, progress: bool = True,
                 log: Callable[[str], None] = log_stderr) -> dict:
    """Compress the default config with one setting changed at a time (full config, shared dense
    statistics), score each on the search and eval splits; ``out/ablation.json`` (resumable) and
    ``out/ablation.md``."""
    from ..models.zoo import load_model

    check_sources(setup.calib, setup.search_data, setup.eval_data)
    out = Path(out)
    check_output(out, setup.inputs())
    path = out / "ablation.json"
    doc = {"setup": setup.to_json(), "results": {}}
    previous = load_entry(path, lambda p: json.loads(p.read_text()))
    if isinstance(previous, dict) and previous.get("setup") == doc["setup"] and "results" in previous:
        doc = previous
    model, tok = load_model(setup.model)
    if tok is None:
        raise VacError(f"{setup.model} has no tokenizer")
    data = setup.data_config()

    def config(**overrides) -> CompressConfig:
        return CompressConfig(StrategyConfig(ratio=setup.ratio, **setup.grid(), **overrides).resolved(), data)

    check_budget(model, config())
    calib = sample_windows(tok, setup.calib, setup.seq_len, setup.calib_windows, seed=0)
    search_w = eval_windows(tok, setup.search_data, setup.seq_len, setup.search_windows)
    eval_w = eval_windows(tok, setup.eval_data, setup.seq_len, setup.eval_windows) if setup.eval_data else None
    _, seq_stats = search_statistics(model, calib, setup, resolve_model(setup.model), progress, log)
    step_cost = max_step(matrices_of(model), setup.rank_step, setup.rank_floor)
    default_key = json.dumps(config().strategy.to_dict(), sort_keys=True)
    rows = []
    for study, setting, overrides in ablation_rows(setup.ratio):
        cfg = config(**overrides)
        key = json.dumps(cfg.strategy.to_dict(), sort_keys=True)
        if key not in doc["results"]:
            t0 = time.perf_counter()
            modules, result = full_compress(model, calib, seq_stats, cfg, step_cost)
            with applied(model, modules) as net:
                entry = {"config": cfg.strategy.to_dict(), "ratio_reached": result.ratio,
                         "params_after": result.params_after,
                         "component_ratio": reached_ratios(matrices_of(model), arch_for(model), result.ranks),
                         "search_ppl": perplexity(net, search_w, progress=False)["ppl"],
                         "eval_ppl": perplexity(net, eval_w, progress=False)["ppl"] if eval_w is not None else None,
                         "seconds": time.perf_counter() - t0}
            del modules
            doc["results"][key] = entry
            write_json(path, doc)
            log(f"ablation {study} = {setting}: search PPL {entry['search_ppl']:.3f}"
                + (f", eval PPL {entry['eval_ppl']:.3f}" if entry["eval_ppl"] is not None else ""))
        rows.append({"study": study, "setting": setting, "default": key == default_key, **doc["results"][key]})
    doc["rows"] = rows
    doc["protocol"] = (f"{setup.model} at {setup.ratio:g}x, vac (the `vac compress` default) with one setting changed; "
                       f"PPL on the first {setup.search_windows} (search: {setup.search_data}) and "
                       f"{setup.eval_windows} (eval: {setup.eval_data}) non-overlapping windows of {setup.seq_len} "
                       f"tokens; calibration {setup.calib_windows} windows of {setup.calib}")
    write_json(path, doc)
    atomic_write(out / "ablation.md", ablation_markdown(doc))
    return doc


def ablation_markdown(doc: dict) -> str:
    fmt = lambda x: "-" if x is None else (f"{x:.2f}" if x < 1e4 else f"{x:.2e}")  # noqa: E731
    lines = [doc["protocol"] + ".", "", "| study | setting | search PPL | eval PPL | ratio reached | attn / mlp |",
             "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        c = r["component_ratio"]
        lines.append(f"| {r['study']} | {r['setting']}{' (default)' if r['default'] else ''} | "
                     f"{fmt(r['search_ppl'])} | {fmt(r['eval_ppl'])} | {r['ratio_reached']:.3f}x | "
                     f"{c['attn']:.2f}x / {c['mlp']:.2f}x |")
    return "\n".join(lines) + "\n"


def ablation_table(doc: dict):
    from rich.table import Table

    table = Table(title="ablation (one setting changed from the default)", show_edge=False)
    for col in ("study", "setting", "search PPL", "eval PPL", "ratio", "attn / mlp"):
        table.add_column(col, justify="left" if col in ("study", "setting") else "right")
    for r in doc["rows"]:
        c = r["component_ratio"]
        table.add_row(r["study"], r["setting"] + (" *" if r["default"] else ""), f"{r['search_ppl']:.3f}",
                      "-" if r["eval_ppl"] is None else f"{r['eval_ppl']:.3f}", f"{r['ratio_reached']:.3f}x",
                      f"{c['attn']:.2f}x / {c['mlp']:.2f}x")
    return table
