"""Where batch-1 decode time goes, dense vs vac: the linears alone vs the whole generate step.

For the dense model and the vac checkpoint as loaded (``stock``) and with
:func:`vac.deploy.decode.fast_decode_` (``layout``), measures per decoded token

* ``step_ms``: greedy ``generate`` with the KV cache, ``(time(tg N) - time(tg 1)) / (N - 1)``, as ``vac bench``;
* ``linears_ms``: every linear of the decoder and the LM head called once, in forward order, on
  random vectors (what the weight-FLOP ratio predicts), the rest of the step is attention, norms,
  rotary embeddings and generate's own work;
* ``prefill``: the time to first token of a ``--prompt-len``-token prompt (as ``vac bench``) under
  ``torch.profiler``, split into matrix products (``aten::mm/addmm/bmm``), attention
  (``scaled_dot_product`` kernels) and everything else (self times).

Variants alternate, best of ``--repeats`` rounds after a warm-up. Writes
``benchmarks/results/decode_probe.json``.

    .venv/bin/python benchmarks/decode_probe.py runs/smollm2-1.8x-depth --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from vac import checkpoint
from vac.atomic import write_json
from vac.deploy.bench import greedy_generate, linear_macs
from vac.deploy.decode import fast_decode_
from vac.models.zoo import load_model

RESULTS = Path(__file__).parent / "results"
ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_pass(model):
    """A function running each linear of one decode step once, in forward order, on random vectors.

    Siblings (q/k/v, gate/up) get the same input tensor, as in the model; consecutive passes use
    different tensors, as consecutive tokens do."""
    plan = []  # (module, input index)
    dims = []
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in ORDER:
                module = getattr(parent, name, None)
                if module is None:
                    continue
                if name in ("q_proj", "gate_proj", "o_proj", "down_proj"):
                    dims.append(module.in_features)
                plan.append((module, len(dims) - 1))
    plan.append((model.lm_head, len(dims)))
    dims.append(model.lm_head.in_features)
    inputs = [[torch.randn(1, 1, d) for d in dims] for _ in range(2)]

    def run(index: int):
        xs = inputs[index % 2]
        for module, i in plan:
            module(xs[i])

    return run


def prefill_split(model, prompt, repeats: int = 3) -> dict:
    """Milliseconds of matrix products and of everything else in a prefill as ``vac bench`` times it
    (greedy generate of one token: the LM head on the last position only; profiler self times, the
    fastest of ``repeats`` profiled runs after a warm-up)."""
    greedy_generate(model, prompt, 1)
    best = None
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            greedy_generate(model, prompt, 1)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / 1e3
        attn = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key) / 1e3
        if best is None or total < best["total_ms"]:
            best = {"total_ms": total, "matmul_ms": mm, "attention_ms": attn, "other_ms": total - mm - attn}
    return best


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--baseline", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--out", type=Path, default=RESULTS / "decode_probe.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    models = {"dense": load_model(args.baseline)[0]}
    for name, layout in (("vac-stock", False), ("vac-layout", True)):
        model, _ = checkpoint.load(args.checkpoint, dtype=torch.float32)
        if layout:
            fast_decode_(model)
        models[name] = model
    ids = torch.randint(3, 40000, (1, 8), generator=torch.Generator().manual_seed(0))
    times = {name: {"tg1": [], "tgN": [], "linears": []} for name in models}
    with torch.inference_mode():
        for rnd in range(args.repeats + 1):
            for name, model in models.items():
                run = linear_pass(model)
                t1 = timed(lambda: greedy_generate(model, ids, 1))
                tn = timed(lambda: greedy_generate(model, ids, args.tokens))
                tl = min(timed(lambda i=i: run(i)) for i in range(4))
                if rnd:
                    for key, value in zip(("tg1", "tgN", "linears"), (t1, tn, tl)):
                        times[name][key].append(value)
            print(f"round {rnd}/{args.repeats}", flush=True)
    prompt = torch.randint(3, 40000, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        prefill = {name: prefill_split(model, prompt) for name, model in models.items()}
    rows = {}
    for name, t in times.items():
        step = (min(t["tgN"]) - min(t["tg1"])) / (args.tokens - 1)
        lin = min(t["linears"])
        rows[name] = {"step_ms": 1e3 * step, "linears_ms": 1e3 * lin, "rest_ms": 1e3 * (step - lin),
                      "linear_macs_per_token": linear_macs(models[name]), "prefill": prefill[name]}
    dense = rows["dense"]
    for name, r in rows.items():
        r["step_speedup"] = dense["step_ms"] / r["step_ms"]
        r["linears_speedup"] = dense["linears_ms"] / r["linears_ms"]
        r["flops_ratio"] = dense["linear_macs_per_token"] / r["linear_macs_per_token"]
        r["prefill"]["speedup"] = dense["prefill"]["total_ms"] / r["prefill"]["total_ms"]
        r["prefill"]["matmul_speedup"] = dense["prefill"]["matmul_ms"] / r["prefill"]["matmul_ms"]
    doc = {"checkpoint": str(args.checkpoint), "baseline": args.baseline, "threads": args.threads,
           "repeats": args.repeats, "decode_tokens": args.tokens, "torch": torch.__version__, "models": rows,
           "protocol": "batch 1, fp32; step = greedy generate with KV cache after an 8-token prompt, "
                       "(tg N - tg 1)/(N-1); linears = each linear once on random vectors; best of repeats; "
                       f"prefill = fastest of 3 profiled times to first token of {args.prompt_len}-token prompts "
                       "(self CPU times)"}
    write_json(args.out, doc)
    print(f"{'':12}{'step ms':>9}{'linears ms':>12}{'rest ms':>9}{'step x':>8}{'linears x':>11}{'flops x':>9}")
    for name, r in rows.items():
        print(f"{name:12}{r['step_ms']:9.2f}{r['linears_ms']:12.2f}{r['rest_ms']:9.2f}"
              f"{r['step_speedup']:8.3f}{r['linears_speedup']:11.3f}{r['flops_ratio']:9.3f}")
    print(f"prefill of {args.prompt_len}: " + "; ".join(
        f"{n} {r['prefill']['matmul_ms']:.0f} ms products + {r['prefill']['attention_ms']:.0f} ms attention"
        f" + {r['prefill']['other_ms']:.0f} ms other"
        f" ({r['prefill']['speedup']:.3f}x, products {r['prefill']['matmul_speedup']:.3f}x)" for n, r in rows.items()))


if __name__ == "__main__":
    main()
