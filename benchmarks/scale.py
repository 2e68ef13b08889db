"""Scale benchmark: peak memory and time of `vac compress` on OLMo-3-7B-shaped random checkpoints.

Random bf16 checkpoints with OLMo-3-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocab 100278) and
a few decoder layers are written shard by shard (never a whole model in memory), then compressed at
1.8x by `vac compress` in a subprocess under `/usr/bin/time -v`, streamed (the default) and in memory
(`--in-memory`, the code before layer streaming), with reduced calibration (8 windows × 256 tokens, 2
Fisher windows). Records peak RSS, wall time, time per layer and disk use →
results/scale.json; the README's table is built from that file. Resumable: finished runs are kept.

    .venv/bin/python benchmarks/scale.py --layers 2 4 8 --modes streamed in-memory
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from vac.atomic import write_json
from vac.cache import cache_dir

RESULTS = Path(__file__).parent / "results" / "scale.json"
SHAPES = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
              vocab_size=100278, max_position_embeddings=4096)


def build(folder: Path, layers: int) -> Path:
    """A random OLMo-3-shaped bf16 checkpoint, one safetensors shard per layer, and a tokenizer."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import Olmo3Config, Olmo3ForCausalLM

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import tiny_tokenizer

    config = Olmo3Config(**SHAPES, num_hidden_layers=layers, tie_word_embeddings=False, dtype="bfloat16",
                         layer_types=["full_attention"] * layers, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    with init_empty_weights():
        model = Olmo3ForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        shard = f"model-{name.split('.')[2]}.safetensors" if name.startswith("model.layers.") else "model-rest.safetensors"
        groups.setdefault(shard, {})[name] = p
    for shard, params in groups.items():
        tensors = {}
        for name, p in params.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(p.shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
            weight_map[name] = shard
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        del tensors
    total = sum((folder / s).stat().st_size for s in groups)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def run(source: Path, out: Path, calib: Path, mode: str, extra: list[str] = ()) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "vac.cli", "compress", str(source), "--out", str(out),
           "--overwrite", "--ratio", "1.8", "--calib", str(calib), "--calib-windows", "8", "--seq-len", "256",
           "--fisher-windows", "2", "--eval", "", "--no-stats-cache", *extra] + (["--in-memory"] if mode == "in-memory" else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    row = {"mode": mode, "returncode": proc.returncode, "wall_s": wall,
           "peak_rss_gib": int(rss.group(1)) / 2**20 if rss else None, "command": " ".join(cmd[2:])}
    if proc.returncode == 0:
        report = json.loads((out / "report.json").read_text())
        row |= {"seconds": report["seconds"], "ratio_reached": report["ratio_reached"],
                "out_disk_gib": sum(f.stat().st_size for f in out.iterdir()) / 2**30}
    else:  # the command's last line, or the signal that ended it (printed by /usr/bin/time before its report)
        own = proc.stderr.partition("\tCommand being timed:")[0]
        signal = re.search(r"Command terminated by signal (\d+)", own)
        row["error"] = [f"terminated by signal {signal.group(1)}"] if signal else own.strip().splitlines()[-1:]
    return row


def plan(source: Path) -> dict:
    """The memory model of vac.core.memory for this source at the benchmark's settings (GiB), and the
    issue's target: embeddings + head + 2 layers in fp32 + one layer's fp64 statistics + activations + 1 GB."""
    from vac.config import StrategyConfig
    from vac.core.memory import FP32, FP64, Shapes, stage_bytes
    from vac.core.stream import skeleton
    from vac.models.families import arch_for

    model, reader = skeleton(source, "meta")
    shapes = Shapes.of(model.config, arch_for(model), lambda name: reader.shape(f"{name}.weight"))
    stages = stage_bytes(shapes, windows=8, seq_len=256, fisher_windows=2, batch_size=8,
                         refine=StrategyConfig().resolved().refine)  # what `vac compress` runs
    target = (2 * shapes.vocab * shapes.hidden * FP32 + 2 * shapes.layer_params() * FP32
              + sum(n * n * FP64 for n in shapes.group_inputs()) + 2 * 8 * 256 * shapes.hidden * FP32 + 10**9)
    return {"stages_gib": {k: v / 2**30 for k, v in stages.items()}, "target_gib": target / 2**30}


def table(doc: dict) -> str:
    """The README's markdown table of results/scale.json."""
    lines = ["| layers | mode | peak RSS | memory model | target | wall | statistics + curves | factorization / layer | source → output on disk |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(doc["runs"].values(), key=lambda r: (r["layers"], r["mode"])):
        if row.get("returncode") != 0:  # e.g. the kernel's OOM killer: /usr/bin/time still gives the peak
            peak = f"killed at {row['peak_rss_gib']:.2f} GiB" if row.get("peak_rss_gib") else "failed"
            wall = f"{row['wall_s'] / 60:.1f} min" if row.get("wall_s") else "-"
            lines.append(f"| {row['layers']} | {row['mode']} | {peak}: {' '.join(row.get('error') or [])} | - | - | "
                         f"{wall} | - | - | {row['source_disk_gib']:.2f} → - |")
            continue
        streamed = "plan" in row and row["mode"] == "streamed"  # the memory model and target are the streamed path's
        target = f"{row['plan']['target_gib']:.2f} GiB" if streamed else "-"
        model = f"{max(row['plan']['stages_gib'].values()):.2f} GiB" if streamed else "-"
        wall = f"{row['wall_s'] / 60:.1f} min" if row.get("wall_s") else "resumed"
        seconds = row["seconds"]
        stats = f"{(seconds['statistics'] + seconds['allocation']) / 60:.1f} min" if "statistics" in seconds else "-"
        lines.append(f"| {row['layers']} | {row['mode']} | {row['peak_rss_gib']:.2f} GiB | {model} | {target} | {wall} | {stats} | "
                     f"{row['factorization_s_per_layer'] / 60:.1f} min | "
                     f"{row['source_disk_gib']:.2f} → {row['out_disk_gib']:.2f} GiB |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--modes", nargs="+", default=["streamed", "in-memory"], choices=["streamed", "in-memory"])
    ap.add_argument("--work", type=Path, default=cache_dir() / "bench" / "scale")
    ap.add_argument("--table", action="store_true", help="print the README table of the results and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(RESULTS.read_text())))
        return
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import word_text

    calib = args.work / "calib.txt"
    if not calib.is_file():
        calib.parent.mkdir(parents=True, exist_ok=True)
        calib.write_text(word_text(8 * 256 * 2, seed=1))
    doc = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"shapes": SHAPES, "runs": {}}
    for layers in args.layers:
        source = build(args.work / f"olmo3-7b-shape-{layers}L", layers)
        source_gib = sum(f.stat().st_size for f in source.glob("*.safetensors")) / 2**30
        for mode in args.modes:
            key = f"{layers}L-{mode}"
            if key in doc["runs"]:
                continue
            row = run(source, args.work / f"out-{layers}L-{mode}", calib, mode)
            row |= {"layers": layers, "source_disk_gib": source_gib, "plan": plan(source)}
            if row.get("seconds"):
                row["factorization_s_per_layer"] = row["seconds"].get("factorization", 0) / layers
            print(json.dumps(row), flush=True)
            doc["runs"][key] = row
            write_json(RESULTS, doc)


if __name__ == "__main__":
    main()
