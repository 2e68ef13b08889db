"""Per-rank memory of distilling an OLMo-3-7B student at 1.8x, from the configuration (issue #17).

`vac.recover.memory.distill_bytes` on the real model's shapes (hidden 4096, MLP 11008, 32 layers,
vocabulary 100278, untied head) and a 1.8x student (every decoder linear at the uniform rank that
meets 1.8x; the knapsack's ranks give the same total), for 1, 2, 4 and 8 GPUs: FSDP2 over the ranks
(one GPU: no sharding), bf16 compute, activation checkpointing, sequences of 2048 tokens, one sequence
per micro-batch, loss chunks of 128 positions; with the teacher on the GPUs or from a top-k cache.
Writes benchmarks/results/distill_memory.json; ``--table`` prints the README table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "distill_memory.json"
SHAPES = dict(vocab_size=100278, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=65536,
              tie_word_embeddings=False)
RATIO = 1.8
SETTINGS = dict(bf16=True, grad_checkpoint=True, micro_batch=1, seq_len=2048, loss_chunk=128)


def plan() -> dict:
    import transformers

    from vac import checkpoint
    from vac.config import DISTILL_TOP_K
    from vac.recover.memory import Net, distill_bytes

    dense = transformers.Olmo3Config(**SHAPES)
    config_class, _ = checkpoint.vac_classes(dense)
    h, inter = SHAPES["hidden_size"], SHAPES["intermediate_size"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    ranks = {f"model.layers.{i}.{name}": int(o * n / (RATIO * (o + n)))
             for i in range(SHAPES["num_hidden_layers"]) for name, (o, n) in shapes.items()}
    student = Net.of(config_class(**dense.to_dict() | {"vac_ranks": ranks}))
    teacher = Net.of(dense)
    rows = []
    for world in (1, 2, 4, 8):
        for cached in (False, True):
            terms = distill_bytes(student, teacher, world=world, fsdp=world > 1, cached_teacher=cached,
                                  top_k=DISTILL_TOP_K, **SETTINGS)
            rows.append({"gpus": world, "teacher": "top-k cache" if cached else "on the GPUs",
                         "gib": {k: v / 2**30 for k, v in terms.items()}})
    return {"student_params": student.params, "teacher_params": teacher.params, "ratio": RATIO,
            "settings": SETTINGS, "rows": rows,
            "final_save_host_gib": 2 * student.params * 4 / 2**30}


def table(doc: dict) -> str:
    keys = [k for k in doc["rows"][0]["gib"] if k != "peak"]
    lines = ["| GPUs | teacher | " + " | ".join(keys) + " | **per GPU** |",
             "|---" * (len(keys) + 3) + "|"]
    for r in doc["rows"]:
        lines.append(f"| {r['gpus']} | {r['teacher']} | " + " | ".join(f"{r['gib'][k]:.1f}" for k in keys)
                     + f" | **{r['gib']['peak']:.1f} GiB** |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(RESULTS.read_text())))
        return
    sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
    from vac.atomic import write_json

    doc = plan()
    write_json(RESULTS, doc)
    print(table(doc))


if __name__ == "__main__":
    main()
