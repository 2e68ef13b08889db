"""The ``vac`` command line."""

from __future__ import annotations

import functools
import json
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .atomic import write_json
from .data import DEFAULT_CALIB, DEFAULT_EVAL
from .diskcache import cache_key, cached_dense_statistics
from .errors import VacError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
out = Console()
err = Console(stderr=True)


def friendly(fn):
    """Turn VacError (and data errors) into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VacError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measured_ppl(model, tokenizer, source: str, data: str, seq_len: int, windows: int, cache=False):
    """Perplexity under the protocol; results for unchanged model folders are cached on disk."""
    from .corpora import cache_dir
    from .data import eval_windows
    from .evaluate import perplexity

    path = None
    key = cache_key(source, data, seq_len, windows, str(model.dtype)) if cache else None
    if key:
        path = cache_dir() / "ppl" / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
    result = perplexity(model, eval_windows(tokenizer, data, seq_len, windows)) | {"data": data}
    if path is not None:
        write_json(path, result, indent=None)
    return result


@app.command("eval")
@friendly
def eval_cmd(
    model: str = typer.Argument("smollm2-135m", help="embedded name, model folder, vac checkpoint or hub id"),
    data: str = typer.Option(DEFAULT_EVAL, help="text source, e.g. austen:eval, a .txt/.jsonl file or folder"),
    seq_len: int = typer.Option(512, help="window length in tokens"),
    windows: Optional[int] = typer.Option(40, help="number of windows (first N, non-overlapping)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
):
    """Perplexity: non-overlapping windows, all shifted tokens scored, use_cache=False."""
    from .report import summary_table
    from .zoo import load_model, resolve_model

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
def compress(
    model: str = typer.Argument("smollm2-135m", help="embedded name, model folder or hub id"),
    ratio: float = typer.Option(1.8, help="parameter reduction of the decoder linears (> 1)"),
    out_dir: Path = typer.Option(..., "--out", help="checkpoint folder to write"),
    method: str = typer.Option("vac", help="vac | whiten | asvd | fwsvd | svd"),
    allocation: Optional[str] = typer.Option(None, help="uniform | depth (each matrix type's budget spread over the "
                                             "layers by a knapsack) | global (one knapsack) [default: vac depth, else uniform]"),
    sequential: Optional[bool] = typer.Option(None, "--sequential/--no-sequential",
                                              help="statistics from compressed earlier layers [default: vac only]"),
    correct: bool = typer.Option(False, "--correct/--no-correct",
                                 help="sequential: fit the dense outputs from compressed inputs (experimental)"),
    order: str = typer.Option("front-to-back", help="front-to-back | middle-out | back-to-front | 3,2,1,0"),
    fisher_exponent: Optional[float] = typer.Option(None, help="tempering exponent of the Fisher information "
                                                    "[default: vac 2/3, fwsvd 1/2]"),
    attn_ratio: Optional[float] = typer.Option(None, help="fixed budget ratio of the attention linears "
                                              "[vac: 1 + 2.5·(ratio − 1), 3.0 at --ratio 1.8; pass the --ratio value for no split]"),
    mlp_ratio: Optional[float] = typer.Option(None, help="fixed budget ratio of the MLP linears"),
    rank_step: int = typer.Option(8, help="rank grid step of the allocation"),
    rank_floor: int = typer.Option(8, help="smallest rank a matrix can get"),
    calib: str = typer.Option(DEFAULT_CALIB, help="calibration text source"),
    calib_windows: int = typer.Option(64, help="calibration windows"),
    fisher_windows: int = typer.Option(16, help="windows for the Fisher backward passes"),
    seq_len: int = typer.Option(512, help="window length for calibration and evaluation"),
    seed: int = typer.Option(0, help="calibration sampling seed"),
    eval_data: str = typer.Option(DEFAULT_EVAL, "--eval", help="held-out text source ('' to skip)"),
    eval_windows: int = typer.Option(40, help="evaluation windows"),
    dtype: str = typer.Option("fp32", help="storage dtype of the checkpoint: fp32 | bf16"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda[:N] for the whole compression [default: cuda when available]"),
    stats_cache: bool = typer.Option(True, "--stats-cache/--no-stats-cache",
                                     help="reuse the dense statistics of an earlier run (cached under $VAC_HOME/stats)"),
    overwrite: bool = typer.Option(False, help="replace an existing --out folder"),
    strategy: Optional[Path] = typer.Option(None, help="strategy JSON of `vac search`: its fields replace "
                                            "--ratio, --method, --order, --fisher-exponent, ... (not the data options)"),
):
    """Compress MODEL so its decoder linears hold RATIO-times fewer parameters, and save it."""
    import torch

    from . import checkpoint
    from .arch import arch_for
    from .data import sample_windows
    from .pipeline import VacConfig, check_budget
    from .pipeline import compress as run_compress
    from .report import heatmap, rank_grid, rank_table, summary_table
    from .zoo import load_model, pick_device, resolve_model

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise VacError(f"--dtype must be fp32 or bf16, got {dtype}")
    if out_dir.exists() and not overwrite:
        raise VacError(f"output folder {out_dir} already exists (pass --overwrite to replace it)")
    cfg = VacConfig(
        ratio=ratio, method=method, allocation=allocation, sequential=sequential, correct=correct,
        order=order if not order.replace(",", "").isdigit() else [int(x) for x in order.split(",")],
        fisher_exponent=fisher_exponent, attn_ratio=attn_ratio, mlp_ratio=mlp_ratio,
        rank_step=rank_step, rank_floor=rank_floor, calib=calib, calib_windows=calib_windows,
        fisher_windows=fisher_windows, seq_len=seq_len, seed=seed,
    )
    if strategy is not None:
        from .search import load_strategy

        cfg = VacConfig(**{**cfg.to_dict(), **load_strategy(strategy)})
    started = time.perf_counter()
    target = pick_device(device)
    source = resolve_model(model)
    net, tok = load_model(model)
    net.to(target)
    arch = arch_for(net)
    if tok is None:
        raise VacError(f"{model} has no tokenizer")
    check_budget(net, cfg)
    windows = sample_windows(tok, calib, seq_len, calib_windows, seed)
    before = measured_ppl(net, tok, source, eval_data, seq_len, eval_windows, cache=True) if eval_data else None
    shapes = {n: tuple(m.weight.shape) for n, m in net.named_modules() if hasattr(m, "weight")
              and m.weight is not None and m.weight.dim() == 2}
    t0 = time.perf_counter()
    stats = [cached_dense_statistics(net, windows.to(target), cfg, source if stats_cache else None, log=err.print)]
    stats_seconds = time.perf_counter() - t0
    # handed over, not kept here: compress frees each layer's statistics once that layer is done
    result = run_compress(net, windows, cfg, stats=stats.pop())
    result.seconds["statistics"] = stats_seconds
    after = measured_ppl(net, tok, source, eval_data, seq_len, eval_windows) if eval_data else None
    n_layers = len(net.get_submodule(arch.layers))
    kinds, rows = rank_grid(arch, n_layers, result.ranks, shapes)
    comp = {}
    for c in ("attn", "mlp"):
        paths = [p for p in arch.decoder_linears(n_layers) if arch.component(p) == c]
        dense = sum(shapes[p][0] * shapes[p][1] for p in paths)
        kept = sum(result.ranks[p] * sum(shapes[p]) if p in result.ranks else shapes[p][0] * shapes[p][1]
                   for p in paths)
        comp[c] = dense / kept
    report = {
        "model": model, "config": cfg.to_dict(),
        "decoder_linear_params": {"before": result.params_before, "after": result.params_after},
        "ratio_reached": result.ratio, "component_ratio": comp,
        "model_params_after": sum(p.numel() for p in net.parameters()),
        "ppl_before": before, "ppl_after": after,
        "protocol": f"{eval_windows} non-overlapping windows of {seq_len} tokens of {eval_data}, "
                    "all shifted tokens scored, use_cache=False",
        "seconds": {**result.seconds, "total": time.perf_counter() - started},
        "peak_rss_mb": peak_rss_mb(), "device": str(target), "ranks": result.ranks,
        "command": " ".join(["vac"] + sys.argv[1:]),
    }
    png = heatmap(kinds, rows, f"{model} {cfg.method} {result.ratio:.2f}x")
    net.to("cpu")
    checkpoint.save(net, tok, out_dir, overwrite=overwrite, dtype=dtypes[dtype],
                    extra={"report.json": report, "ranks.png": png})
    err.print(rank_table(kinds, rows))
    ppl = lambda r: f"{r['ppl']:.2f}" if r else "-"  # noqa: E731
    out.print(summary_table(f"vac compress: {model} → {out_dir}", [
        ("method", f"{cfg.method} ({cfg.allocation}, {'sequential ' + str(cfg.order) if cfg.sequential else 'dense statistics'})"),
        ("decoder linear params", f"{result.params_before:,} → {result.params_after:,}"),
        ("ratio reached", f"{result.ratio:.3f}x (attn {comp['attn']:.2f}x, mlp {comp['mlp']:.2f}x)"),
        ("PPL before → after", f"{ppl(before)} → {ppl(after)}  ({eval_data}, {eval_windows}x{seq_len})"),
        ("time", f"{report['seconds']['total']:.0f} s"),
        ("peak RSS", f"{report['peak_rss_mb']:.0f} MB"),
    ]))


# commands defined in their own modules register themselves on `app`
from . import cli_deploy, cli_distill, cli_search, cli_use  # noqa: E402,F401


def main():
    app()


if __name__ == "__main__":
    main()
