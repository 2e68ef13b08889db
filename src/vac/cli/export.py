"""``vac export``: a checkpoint (vac or dense) in a runtime's format; ONNX for ONNX Runtime today."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .app import app, command_line, err, friendly, out


@app.command()
@friendly
def export(
    source: str = typer.Argument(..., help="vac checkpoint folder, dense model folder or embedded model name"),
    onnx: Path = typer.Option(..., "--onnx", help="folder to write the ONNX model to"),
    int8: bool = typer.Option(False, "--int8", help="int8 weights on the decoder's linears (onnxruntime quantize_dynamic)"),
    opset: Optional[int] = typer.Option(None, help="ONNX opset [default: the newest onnxscript supports]"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
):
    """One ONNX graph (prefill + cached decode) of SOURCE, with its tokenizer, for `--runtime onnx`."""
    from ..core.report import summary_table
    from ..deploy.onnx_export import OnnxExportConfig, export_onnx

    summary = export_onnx(source, onnx, OnnxExportConfig(int8=int8, opset=opset), overwrite=overwrite,
                          command=command_line(), log=lambda msg: err.print(f"[dim]{msg}[/dim]", highlight=False))
    if as_json:
        print(json.dumps(summary))
        return
    rows = [
        ("model", f"{summary['kind']} {summary['model_type']}, {summary['params'] / 1e6:,.1f} M parameters"),
        ("graph", f"{onnx / summary['graph']} (+ .data), {summary['weights_bytes'] / 1e6:,.1f} MB"),
        ("int8", f"{summary['int8_matmuls']} decoder MatMuls" if summary["int8"] else "no"),
        ("cache", f"{len(summary['cache']['inputs']) // 2} layers of keys/values"),
        ("export time", f"{summary['export_seconds']:.1f} s"),
    ]
    out.print(summary_table(f"vac export: {source} → {onnx}", rows))
