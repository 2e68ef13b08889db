"""``vac quantize`` and ``vac bench``: deployment commands (registered on the main ``vac`` app)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import VacError
from .app import app, check_runtime, command_line, err, friendly, out


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


@app.command()
@friendly
def quantize(
    checkpoint_dir: Path = typer.Argument(..., help="vac checkpoint folder to quantize"),
    out_dir: Path = typer.Option(..., "--out", help="folder to write the int8 checkpoint to"),
    scheme: str = typer.Option("weight-only", help="weight-only (int8 weights) | dynamic (int8 activations too)"),
    eval_data: str = typer.Option("", "--eval", help="text source for perplexity before/after, e.g. austen:eval "
                                                     "('' skips it)"),
    eval_windows: int = typer.Option(40, help="evaluation windows"),
    seq_len: int = typer.Option(512, help="evaluation window length"),
    overwrite: bool = typer.Option(False, help="replace an existing --out folder"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
):
    """INT8 (torchao) on the low-rank factors; the folder reloads with transformers + torchao."""
    from ..core.report import summary_table
    from ..deploy.quantize import quantize_checkpoint

    summary = quantize_checkpoint(
        checkpoint_dir, out_dir, scheme=scheme, overwrite=overwrite, eval_data=eval_data or None,
        eval_windows=eval_windows, seq_len=seq_len, command=command_line(),
    )
    summary["out"] = str(out_dir)
    if as_json:
        print(json.dumps(summary))
        return
    rows = [
        ("scheme", summary["method"]),
        ("factor linears quantized", str(summary["quantized_linears"])),
        ("weights on disk", f"{_mb(summary['size_before_bytes'])} → {_mb(summary['size_after_bytes'])} "
                            f"({summary['size_ratio']:.2f}x smaller)"),
    ]
    if "ppl_after" in summary:
        rows.append(("PPL fp32 → int8", f"{summary['ppl_before']:.3f} → {summary['ppl_after']:.3f}  "
                                        f"({eval_data}, {eval_windows}x{seq_len})"))
    out.print(summary_table(f"vac quantize: {checkpoint_dir} → {out_dir}", rows))


@app.command("bench")
@friendly
def bench_cmd(
    checkpoint_dir: Path = typer.Argument(..., help="vac checkpoint folder"),
    baseline: Optional[str] = typer.Option(None, help="dense model: embedded name, folder or hub id "
                                                        "[default: the model named in DIR/report.json]"),
    int8: Optional[Path] = typer.Option(None, "--int8", help="its int8 checkpoint (vac quantize), benchmarked too"),
    prompt_len: int = typer.Option(512, help="prompt length of the prefill (time to first token)"),
    decode_tokens: int = typer.Option(64, help="tokens generated per decode run"),
    repeats: int = typer.Option(3, help="rounds (after one warm-up); the best counts"),
    threads: Optional[int] = typer.Option(None, help="torch threads [default: torch's]"),
    fast_decode: bool = typer.Option(True, "--fast-decode/--stock",
                                     help="decode layout for the vac models (see vac.deploy.decode.fast_decode_)"),
    compare_stock: bool = typer.Option(False, help="also run the checkpoint as loaded (vac-stock)"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile every model (dense too) and decode with "
                                  "a static KV cache; compiling takes minutes"),
    load_rss: bool = typer.Option(True, "--load-rss/--no-load-rss",
                                  help="measure each folder's load in a fresh process (peak RSS)"),
    runtime: str = typer.Option("torch", help="torch (transformers, eager or --compile) | onnx (ONNX Runtime; "
                                "DIR and --baseline may be checkpoints or their `vac export --onnx` folders)"),
    export_dir: Optional[Path] = typer.Option(None, help="--runtime onnx: where to export the checkpoints "
                                              "(reused on the next run) [default: a temporary folder]"),
    onnx_int8: bool = typer.Option(False, "--onnx-int8", help="--runtime onnx: the int8 export of DIR too"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
):
    """Dense vs factorized (vs int8) in one process: prefill and decode tokens/s, size, memory, FLOPs."""
    from ..deploy.bench import bench

    check_runtime(runtime)
    if runtime == "onnx":
        if int8 is not None or compile_:
            raise VacError("--int8 and --compile are for --runtime torch (use --onnx-int8 with --runtime onnx)")
        return _bench_onnx(checkpoint_dir, baseline, onnx_int8, prompt_len, decode_tokens, repeats, threads,
                           export_dir, as_json)
    if onnx_int8 or export_dir is not None:
        raise VacError("--onnx-int8 and --export-dir need --runtime onnx")
    result = bench(
        checkpoint_dir, baseline, int8, prompt_len=prompt_len, decode_tokens=decode_tokens, repeats=repeats,
        threads=threads, load_rss=load_rss, decode_layout=fast_decode, compare_stock=compare_stock,
        use_compile=compile_,
        log=lambda msg: err.print(f"[dim]{msg}[/dim]", highlight=False),
    )
    result["command"] = command_line()
    if as_json:
        print(json.dumps(result))
        return
    models = result["models"]
    rows = [
        ("parameters", lambda m: f"{m['params'] / 1e6:,.1f} M"),
        ("weight MACs / token", lambda m: f"{m['linear_macs_per_token'] / 1e6:,.1f} M"),
        ("weights on disk", lambda m: _mb(m["disk_bytes"])),
        ("resident after load", lambda m: _mb(m["resident_bytes"])),
        ("load peak RSS (fresh process)", lambda m: _mb(m.get("load_peak_rss_increase_bytes"))),
        *_speed_rows(result, "dense"),
    ]
    out.print(_models_table(f"vac bench: {result['baseline']} vs {checkpoint_dir}", models, rows))
    out.print(f"weight-FLOP ratio (dense / vac), the limit of each speed-up: decode {result['flops_ratio']:.3f}x "
              f"(LM head on every token), prefill {result['prefill_flops_ratio']:.3f}x (LM head once); "
              f"process peak RSS {_mb(result['process_peak_rss_bytes'])}", highlight=False)
    out.print(f"[dim]{result['protocol']}[/dim]", highlight=False)


def _speed_rows(result: dict, baseline: str) -> list:
    """Prefill and decode tokens/s of every model, each against ``baseline``'s."""
    base = result["models"][baseline]
    return [
        (f"prefill {result['prompt_len']} tok/s", lambda m: f"{m['prefill_tokens_per_s']:,.1f}"),
        (f"  vs {baseline}", lambda m: f"{m['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}x"),
        (f"decode tg{result['decode_tokens']} tok/s", lambda m: f"{m['decode_tokens_per_s']:,.2f}"),
        (f"  vs {baseline}", lambda m: f"{m['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x"),
    ]


def _models_table(title: str, models: dict, rows: list):
    """One column per model, one row per (label, cell function of a model's results)."""
    from rich.table import Table

    table = Table(title=title, show_edge=False)
    table.add_column("")
    for name in models:
        table.add_column(name, justify="right")
    for label, cell in rows:
        table.add_row(label, *[cell(m) for m in models.values()])
    return table


def _bench_onnx(checkpoint_dir, baseline, int8, prompt_len, decode_tokens, repeats, threads, export_dir, as_json):
    from ..deploy.bench_onnx import bench_onnx

    result = bench_onnx(checkpoint_dir, baseline, int8=int8, prompt_len=prompt_len, decode_tokens=decode_tokens,
                        repeats=repeats, threads=threads, export_dir=export_dir,
                        log=lambda msg: err.print(f"[dim]{msg}[/dim]", highlight=False))
    result["command"] = command_line()
    if as_json:
        print(json.dumps(result))
        return
    models = result["models"]
    rows = [
        ("parameters", lambda m: f"{m['params'] / 1e6:,.1f} M"),
        ("weight MACs / token", lambda m: f"{m['linear_macs_per_token'] / 1e6:,.1f} M"),
        ("ONNX weights", lambda m: _mb(m.get("onnx_bytes"))),
        *_speed_rows(result, "dense-onnx"),
    ]
    out.print(_models_table(f"vac bench --runtime onnx: {result['baseline']} vs {checkpoint_dir}", models, rows))
    line = (f"weight-FLOP limits (dense / vac): decode {result['flops_ratio']:.3f}x, prefill "
            f"{result['prefill_flops_ratio']:.3f}x; decode reaches {result['decode_efficiency']:.2f} of its limit")
    if "vs_eager_decode_speedup" in result:
        line += (f"; vac-onnx vs dense in eager transformers: decode {result['vs_eager_decode_speedup']:.2f}x, "
                 f"prefill {result['vs_eager_prefill_speedup']:.2f}x")
    out.print(line, highlight=False)
    out.print(f"[dim]{result['protocol']}[/dim]", highlight=False)
