"""Where the time goes in ONNX Runtime: per-operator kernel times of ONNX exports (ORT's profiler).

For each folder (``vac export --onnx`` output): a decode phase (an 8-token prompt, then ``--tokens``
single-token steps) and a prefill phase (``--prompt-len`` tokens on an empty cache), each in a
session with profiling on, 2 threads by default. Reports per operator type the kernel milliseconds
per step and the node count, the weight MatMuls grouped by weight shape (decode), and the wall time
per step (profiling adds a little to it). Profiles one folder at a time, in its own session.

    .venv/bin/python benchmarks/onnx_profile.py runs/onnx/dense runs/onnx/vac → benchmarks/results/onnx_profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def profile(folder: Path, phase: str, threads: int, tokens: int, prompt_len: int) -> dict:
    import onnx_ir
    import onnxruntime as ort

    from vac.deploy.onnx_runtime import OnnxCausalLM

    model = OnnxCausalLM(folder, threads=threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / phase)
        model.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        if phase == "decode":
            _, cache = model.step(rng.integers(3, 1000, (1, 8)), 0, model.empty_cache())
            started = time.perf_counter()
            for i in range(tokens):
                _, cache = model.step(np.array([[5]]), 8 + i, cache)
            steps = tokens + 1
        else:
            ids = rng.integers(3, 1000, (1, prompt_len))
            model.step(ids, 0, model.empty_cache())  # warm-up, profiled too
            started = time.perf_counter()
            for _ in range(3):
                model.step(ids, 0, model.empty_cache())
            steps = 4
        wall = (time.perf_counter() - started) / (steps - 1)
        events = json.loads(Path(model.session.end_profiling()).read_text())
    by_op, count = collections.Counter(), collections.Counter()
    per_node = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            by_op[op] += e["dur"]
            count[op] += 1
            per_node[e["name"][: -len("_kernel_time")]].append(e["dur"])
    out = {
        "wall_ms_per_step": wall * 1e3,
        "kernel_ms_per_step": sum(by_op.values()) / steps / 1e3,
        "nodes_per_step": sum(count.values()) / steps,
        "ops": {op: {"ms": d / steps / 1e3, "nodes": count[op] / steps} for op, d in by_op.most_common()},
    }
    if phase == "decode":  # weight MatMuls by weight shape: where thin factors lose efficiency
        graph = onnx_ir.load(str(folder / "model.onnx"))
        shapes = {n.name: tuple(n.inputs[1].shape) for n in graph.graph if n.op_type == "MatMul"
                  and n.inputs[1] is not None and n.inputs[1].const_value is not None}
        groups = collections.defaultdict(lambda: [0, 0.0])
        for name, durs in per_node.items():
            if name in shapes:
                groups[shapes[name]][0] += 1
                groups[shapes[name]][1] += float(np.median(durs))
        out["weight_matmuls"] = sorted(
            ({"shape": list(s), "nodes": n, "us_each": us / n,
              "gb_per_s": 4 * s[0] * s[1] / (us / n * 1e-6) / 1e9} for s, (n, us) in groups.items()),
            key=lambda r: -r["us_each"] * r["nodes"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "onnx_profile.json")
    args = ap.parse_args()
    from vac.atomic import write_json

    doc = {"command": "python benchmarks/onnx_profile.py " + " ".join(sys.argv[1:]), "threads": args.threads,
           "decode_tokens": args.tokens, "prompt_len": args.prompt_len, "folders": {}}
    for folder in args.folders:
        doc["folders"][str(folder)] = {phase: profile(folder, phase, args.threads, args.tokens, args.prompt_len)
                                       for phase in ("decode", "prefill")}
        for phase, r in doc["folders"][str(folder)].items():
            top = ", ".join(f"{op} {v['ms']:.2f}" for op, v in list(r["ops"].items())[:4])
            print(f"{folder} {phase}: {r['wall_ms_per_step']:.2f} ms/step wall, kernels {r['kernel_ms_per_step']:.2f} "
                  f"ms ({top})", flush=True)
    write_json(args.out, doc)


if __name__ == "__main__":
    main()
