"""Does the ONNX export keep the model? PPL of the vac checkpoint in transformers and of its ONNX
exports (fp32, int8) in ONNX Runtime, on the same windows of every held-out report text.

The ONNX graphs return last-position logits, so they are scored as a decode loop sees them: one
cached step per token. ``--windows`` windows of ``--seq-len`` tokens per text (small: the question is
whether the export changes the model, so every variant is scored on the same tokens), all shifted
tokens scored, as ``vac eval``.

    .venv/bin/python benchmarks/onnx_quality.py runs/smollm2-1.8x runs/onnx/vac runs/onnx/vac-int8
    → benchmarks/results/onnx_quality.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("exports", nargs="+", type=Path)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "onnx_quality.json")
    args = ap.parse_args()
    from vac import checkpoint
    from vac.atomic import write_json
    from vac.config import REPORT_EVALS
    from vac.core.evaluate import perplexity
    from vac.data.windows import eval_windows
    from vac.deploy.onnx_runtime import OnnxCausalLM

    torch.set_num_threads(args.threads)
    model, tok = checkpoint.load(args.checkpoint)
    exports = {str(p): OnnxCausalLM(p, threads=args.threads) for p in args.exports}
    doc = {"command": "python benchmarks/onnx_quality.py " + " ".join(sys.argv[1:]), "windows": args.windows,
           "seq_len": args.seq_len, "texts": {}}
    for spec in REPORT_EVALS:
        windows = eval_windows(tok, spec, args.seq_len, args.windows)
        row = {f"{args.checkpoint} (transformers)": perplexity(model, windows, progress=False)["ppl"]}
        for name, onnx in exports.items():
            nll = [F.cross_entropy(onnx.logits(w[None])[:-1], w[1:], reduction="sum").item() for w in windows]
            row[name] = math.exp(sum(nll) / (windows.numel() - len(windows)))
        doc["texts"][spec] = row
        print(spec, {k: round(v, 3) for k, v in row.items()}, flush=True)
    write_json(args.out, doc)


if __name__ == "__main__":
    main()
