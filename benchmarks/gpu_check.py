"""GPU check: the CUDA paths of vac, and the speed of factorized layers at the target's shapes.

Needs one CUDA GPU and no network (models are built from configs with random weights, text is
synthetic). Parts, each written to ``--out/gpu_check.json`` as soon as it ends:

1. ``cuda_paths``: a small random OLMo-3 (rope_theta 500000, sliding windows) saved with a word-level
   tokenizer; ``vac compress --device cuda`` (vac: Fisher + sequential whitening), the checkpoint
   reloaded with plain transformers (``trust_remote_code=True``) on the GPU and ``generate``; then
   ``vac distill --device cuda`` for a few steps. Checks exit codes, finite PPL, reported device.
2. ``speed``: an OLMo-3-7B-shaped model (hidden 4096, MLP 11008, 32 heads, vocab 100278; random
   weights, bf16) dense vs factorized at uniform ranks for 1.8x fewer decoder-linear parameters
   (random factors: speed does not depend on their values): prefill tokens/s (batch 1 × 2048) and
   greedy decode tokens/s with the KV cache (batch 1 and 16), median of repeats, same process.

3. ``compiled`` (issue #18): the same 7B shape at 1.8x with ranks on the 8-grid, bf16, batch 1:
   prefill of 2048 tokens (one forward) and decode of 128 tokens after that prompt with a static KV
   cache, which transformers' ``generate`` runs through ``torch.compile(mode="reduce-overhead")``
   (CUDA graphs) so decode is not bound by kernel launches; decode = time(tg128) - time(tg1), median
   of repeats after a warm-up that pays the compilations. Targets: decode >= 1.5x, prefill >= 1.4x.
   ``--device cpu --layers 2`` runs it on a small shape without compilation (a dry run of the code).

4. ``scale`` (``--scale``): the streamed ``vac compress --device cuda --ratio 1.8`` of a random
   32-layer OLMo-3-7B-shaped bf16 checkpoint (``benchmarks/scale.py`` builds it shard by shard), with
   reduced calibration; records ``torch.cuda.max_memory_allocated()`` (report.json) and host peak RSS
   (targets: ≤ 24 GB GPU, ≤ 32 GB host).

5. ``distill`` (``--distill``, issue #17): a few ``vac distill --bf16 --grad-checkpoint`` steps of an
   OLMo-3-7B-shaped 1.8x student (random factors) from its random bf16 teacher on one GPU (2048-token
   sequences), ``torch.cuda.max_memory_allocated()`` beside the plan of ``vac.recover.memory`` (73 GiB
   at 32 layers). ``--device cpu --layers 2`` runs it at a small shape.

    python benchmarks/gpu_check.py --out DIR [--layers 32] [--skip-paths] [--skip-speed] [--skip-compiled] [--scale] [--distill]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

import torch  # noqa: E402


def save(out: Path, doc: dict) -> None:
    from vac.atomic import write_json

    write_json(out / "gpu_check.json", doc)


def run(cmd: list[str], log: Path) -> int:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    with log.open("w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def cuda_paths(out: Path, device: str = "cuda") -> dict:
    from conftest import VOCAB, tiny_tokenizer, word_text
    from transformers import AutoModelForCausalLM, Olmo3Config, Olmo3ForCausalLM

    work = out / "paths"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = Olmo3Config(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, sliding_window=64,
        rope_theta=500000.0,
        layer_types=["sliding_attention"] * 3 + ["full_attention"], pad_token_id=0, eos_token_id=1,
        bos_token_id=None,
    )
    Olmo3ForCausalLM(config).save_pretrained(work / "dense")
    tiny_tokenizer().save_pretrained(work / "dense")
    (work / "calib.txt").write_text(word_text(40000, seed=1))
    (work / "eval.txt").write_text(word_text(8000, seed=2))
    py, result = sys.executable, {}
    t0 = time.perf_counter()
    result["compress_rc"] = run([py, "-m", "vac.cli", "compress", str(work / "dense"), "--device", device,
                                 "--ratio", "1.5", "--calib", str(work / "calib.txt"), "--eval", str(work / "eval.txt"),
                                 "--calib-windows", "32", "--fisher-windows", "8", "--seq-len", "128",
                                 "--eval-windows", "16", "--out", str(work / "vac")], out / "compress.log")
    result["compress_s"] = time.perf_counter() - t0
    if result["compress_rc"] == 0:
        report = json.loads((work / "vac" / "report.json").read_text())
        result |= {"device": report.get("device"), "ratio_reached": report["ratio_reached"],
                   "ppl_before": report["ppl_before"]["ppl"], "ppl_after": report["ppl_after"]["ppl"]}
        model = AutoModelForCausalLM.from_pretrained(work / "vac", trust_remote_code=True).to(device).eval()
        ids = torch.tensor([[5, 6, 7, 8]], device=device)
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
        result["generate_tokens"] = gen.shape[1] - ids.shape[1]
        result["loaded_class"] = type(model).__name__
        del model
    t0 = time.perf_counter()
    result["distill_rc"] = run([py, "-m", "vac.cli", "distill", str(work / "vac"), "--teacher",
                                str(work / "dense"), "--data", str(work / "calib.txt"), "--device", device,
                                "--steps", "6", "--seq-len", "128", "--batch-size", "4", "--chat-fraction", "0",
                                "--eval", str(work / "eval.txt"), "--eval-windows", "8", "--eval-seq-len", "128",
                                "--out", str(work / "distilled")], out / "distill.log")
    result["distill_s"] = time.perf_counter() - t0
    if result["distill_rc"] == 0:
        report = json.loads((work / "distilled" / "distill.json").read_text())
        result |= {"distill_ppl_before": report["ppl_before"]["ppl"], "distill_ppl_after": report["ppl_after"]["ppl"]}
    result["ok"] = (result["compress_rc"] == 0 and result["distill_rc"] == 0 and result.get("generate_tokens") == 8
                    and result.get("device", "").startswith(device) and math.isfinite(result.get("ppl_after", math.nan)))
    return result


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def speed(layers: int) -> dict:
    from transformers import Olmo3Config, Olmo3ForCausalLM

    from vac.core.allocate import matrices_of, uniform_ranks
    from vac.models.layers import factorize_

    config = Olmo3Config(
        vocab_size=100278, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, sliding_window=4096,
        rope_theta=500000.0,
        layer_types=["full_attention"] * layers, tie_word_embeddings=False, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        dense = Olmo3ForCausalLM(config).to(torch.bfloat16).eval()
    exact = uniform_ranks(matrices_of(dense), 1.8)

    def random_factors(_path, weight, rank):
        m, n = weight.shape
        return (torch.randn(m, rank, device="cuda", dtype=weight.dtype) / math.sqrt(rank),
                torch.randn(rank, n, device="cuda", dtype=weight.dtype) * weight.std())

    nets = {"dense": dense}
    for align in (1, 8, 64):  # ranks rounded down to a multiple of `align` (1: r = ⌊mn / (1.8 (m+n))⌋)
        nets[f"vac_align{align}"] = factorize_(copy.deepcopy(dense), {p: r // align * align for p, r in exact.items()},
                                               random_factors)
    prompt = torch.randint(0, config.vocab_size, (1, 2048), device="cuda")
    result = {"layers": layers, "gpu": torch.cuda.get_device_name(), "dtype": "bf16", "ranks_q_k_gate": [
        exact[p] for p in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.gate_proj")]}
    for name, net in nets.items():
        result[f"params_{name}"] = sum(p.numel() for p in net.parameters())
        s = timed(lambda: net(prompt, use_cache=False), 5)
        result[f"prefill_tok_s_{name}"] = prompt.numel() / s
        for batch in (1, 16):
            ids = prompt[:, :128].expand(batch, -1).contiguous()
            new = 64
            s = timed(lambda: net.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False), 3)
            result[f"decode_tok_s_b{batch}_{name}"] = batch * new / s
        if name != "dense":
            result[f"prefill_speedup_{name}"] = result[f"prefill_tok_s_{name}"] / result["prefill_tok_s_dense"]
            for batch in (1, 16):
                result[f"decode_speedup_b{batch}_{name}"] = (result[f"decode_tok_s_b{batch}_{name}"]
                                                           / result[f"decode_tok_s_b{batch}_dense"])
    result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


@torch.no_grad()
def compiled(layers: int, device: str = "cuda") -> dict:
    from transformers import Olmo3Config, Olmo3ForCausalLM

    from vac.core.allocate import matrices_of, uniform_ranks
    from vac.models.layers import factorize_

    small = device == "cpu"  # the dry run: a narrow model, fp32, no compilation (CPU generate does not compile)
    hidden, mlp, heads, vocab = (256, 704, 4, 1000) if small else (4096, 11008, 32, 100278)
    prompt_len, new = (64, 8) if small else (2048, 128)
    config = Olmo3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096, sliding_window=4096,
        rope_theta=500000.0, layer_types=["full_attention"] * layers, tie_word_embeddings=False,
        eos_token_id=None, pad_token_id=0,
    )
    dtype = torch.float32 if small else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        dense = Olmo3ForCausalLM(config).to(dtype).eval()
    ranks = {p: max(8, r // 8 * 8) for p, r in uniform_ranks(matrices_of(dense), 1.8).items()}

    def random_factors(_path, weight, rank):
        m, n = weight.shape
        return (torch.randn(m, rank, device=device, dtype=weight.dtype) / math.sqrt(rank),
                torch.randn(rank, n, device=device, dtype=weight.dtype) * weight.std())

    nets = {"dense": dense, "vac": factorize_(copy.deepcopy(dense), ranks, random_factors)}
    prompt = torch.randint(0, vocab, (1, prompt_len), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def median(fn, repeats):
        fn()  # warm-up: compilation and CUDA graph capture
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def generate(net, n):
        return net.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, cache_implementation="static")

    result = {"layers": layers, "device": torch.cuda.get_device_name() if not small else "cpu (dry run)",
              "dtype": str(dtype), "prompt_len": prompt_len, "decode_tokens": new,
              "ranks_q_gate": [ranks["model.layers.0.self_attn.q_proj"], ranks["model.layers.0.mlp.gate_proj"]]}
    for name, net in nets.items():
        result[f"params_{name}"] = sum(p.numel() for p in net.parameters())
        prefill = median(lambda: net(prompt, use_cache=False, logits_to_keep=1), 5)
        first = median(lambda: generate(net, 1), 3)
        full = median(lambda: generate(net, new), 3)
        result[f"prefill_tok_s_{name}"] = prompt_len / prefill
        result[f"decode_tok_s_{name}"] = (new - 1) / (full - first)
    result["prefill_speedup"] = result["prefill_tok_s_vac"] / result["prefill_tok_s_dense"]
    result["decode_speedup"] = result["decode_tok_s_vac"] / result["decode_tok_s_dense"]
    result["targets_met"] = result["decode_speedup"] >= 1.5 and result["prefill_speedup"] >= 1.4
    if not small:
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def scale(out: Path, layers: int) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from conftest import word_text
    from scale import build
    from scale import run as run_scale

    calib = out / "calib.txt"
    calib.write_text(word_text(8 * 256 * 2, seed=1))
    source = build(out / f"olmo3-7b-shape-{layers}L", layers)
    row = run_scale(source, out / "scale-out", calib, "streamed", extra=["--device", "cuda"])
    if row.get("returncode") == 0:
        report = json.loads((out / "scale-out" / "report.json").read_text())
        row["cuda_max_allocated_gib"] = (report.get("cuda_max_allocated_mb") or 0) / 1024
    return row


def distill(out: Path, layers: int, device: str = "cuda", steps: int = 3) -> dict:
    """Part 5 (issue #17): a few distillation steps of an OLMo-3-7B-shaped student at 1.8x (random
    factors) from its random dense teacher on one GPU, as ``vac distill --bf16 --grad-checkpoint``
    runs them (sequences of 2048, one per step, loss chunks of 128); the peak GPU memory beside
    ``vac.recover.memory``'s plan. ``--device cpu``: the same code at a small shape (a dry run)."""
    from transformers import Olmo3Config, Olmo3ForCausalLM

    from vac.core.allocate import matrices_of, uniform_ranks
    from vac.models.layers import factorize_
    from vac.recover.data import DataMix, Samples
    from vac.recover.distill import Dist, DistillConfig, run_distill
    from vac.recover.memory import Net, distill_bytes

    small = device == "cpu"
    shape = dict(vocab_size=512 if small else 100278, hidden_size=128 if small else 4096,
                 intermediate_size=352 if small else 11008, num_attention_heads=4 if small else 32,
                 num_key_value_heads=4 if small else 32)
    seq = 64 if small else 2048
    config = Olmo3Config(**shape, num_hidden_layers=layers, max_position_embeddings=4096, sliding_window=4096,
                         rope_theta=500000.0, layer_types=["full_attention"] * layers, tie_word_embeddings=False,
                         eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        teacher = Olmo3ForCausalLM(config).to(torch.bfloat16).eval()
        student = Olmo3ForCausalLM(config)
    ranks = uniform_ranks(matrices_of(student), 1.8)
    student = factorize_(student, ranks, lambda _p, w, r: (torch.randn(w.shape[0], r, device=w.device) / math.sqrt(r),
                                                          torch.randn(r, w.shape[1], device=w.device) * w.std()))
    ids = torch.randint(0, config.vocab_size, (steps * 2, seq))
    cfg = DistillConfig(steps=steps, seq_len=seq, batch_size=1, warmup=1, save_every=10**6, bf16=True,
                        grad_checkpoint=True)
    if not small:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = run_distill(student, teacher, DataMix(Samples.windows(ids)), cfg, out / "distill-out", progress=False,
                         env=Dist(device=torch.device(device)))
    plan = distill_bytes(Net.of(student.config), Net.of(config), world=1, fsdp=False, bf16=True,
                         grad_checkpoint=True, micro_batch=1, seq_len=seq, loss_chunk=cfg.loss_chunk,
                         top_k=cfg.top_k, cached_teacher=False)
    row = {"layers": layers, "steps": steps, "seq_len": seq, "seconds": time.perf_counter() - t0,
           "tokens_per_s": result.report["tokens_per_second"], "loss_curve": [r["loss"] for r in result.report["loss_curve"]],
           "plan_gib": {k: v / 2**30 for k, v in plan.items()}}
    if not small:
        row["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["gpu"] = torch.cuda.get_device_name()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--skip-paths", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-compiled", action="store_true")
    ap.add_argument("--scale", action="store_true", help="also the streamed compress of a 7B-shaped model")
    ap.add_argument("--distill", action="store_true", help="also a few distillation steps of a 7B-shaped student")
    ap.add_argument("--device", default="cuda", help="cpu runs part 1 only (a dry run of the script)")
    args = ap.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"torch": torch.__version__}
    for part, fn in (("cuda_paths", None if args.skip_paths else lambda: cuda_paths(args.out, args.device)),
                     ("speed", None if args.skip_speed or args.device == "cpu" else lambda: speed(args.layers)),
                     ("compiled", None if args.skip_compiled else lambda: compiled(args.layers, args.device)),
                     ("scale", None if not args.scale or args.device == "cpu" else lambda: scale(args.out, args.layers)),
                     ("distill", None if not args.distill else lambda: distill(args.out, args.layers, args.device))):
        if fn is None:
            continue
        try:
            doc[part] = fn()
        except Exception as e:  # record and go on: one device session, both parts wanted
            doc[part] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        save(args.out, doc)
        print(json.dumps({part: doc[part]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
