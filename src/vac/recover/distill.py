"""Recovery by knowledge distillation: train a factorized student against its dense teacher.

Loss of one optimizer step, over the whole global batch (all micro-batches of all ranks)::

    loss = α·T²·KL + (1−α)·NLL
    KL   = (1/N) Σ_positions KL(p_T ‖ q_T)       p_T = softmax(teacher/T), q_T = softmax(student/T)
    NLL  = (1/N) Σ_positions −log softmax(student)[next token]

where the sums run over the N *scored positions* of the global batch: every position whose next token is
a real token (padding of chat samples is not scored). Both terms are per-token means over the same N,
so α weighs two quantities of the same scale (the published code summed the KL over positions, which
made it hundreds of times larger than the NLL). Each rank divides its local sums by the global N
(known to every rank: all ranks build the same global batch and take their slice), and DDP/FSDP
average gradients over ranks, so local losses are multiplied by the world size: the gradient equals
that of the single-process loss on the same global batch. The loss is computed from the final hidden
states by :func:`vac.recover.loss.head_kd_loss`, which applies the LM head a chunk of tokens at a time.

Teacher logits come either live (the teacher runs in the same process, full-vocabulary KL) or from a
top-k cache on disk (``teacher_cache``): for every position the ``k`` largest teacher logits (float16)
and their token ids (int32) are stored, per sample, in a file named by the hash of the sample's tokens.
The cached KL is taken on the renormalized top-k support S (the teacher's k most likely tokens)::

    p_i = exp(t_i/T) / Σ_{j∈S} exp(t_j/T),   q_i = exp(s_i/T) / Σ_{j∈S} exp(s_j/T),   KL = Σ_{i∈S} p_i log(p_i/q_i)

i.e. both distributions are restricted to S and renormalized there; the NLL term still uses the
student's full softmax. The cache is filled in a pass of its own (:func:`fill_teacher_cache`, ``vac
distill --cache-teacher-only``: the teacher over exactly the batches training will read), so the
training run never holds the teacher: it only reads the cache, and a batch missing from it stops the
run with a one-line error instead of loading the teacher.

Data (:mod:`vac.recover.data`): ``DataMix`` interleaves non-overlapping text windows of a source with chat-formatted samples
(rendered with the tokenizer's chat template, right-padded, padding not scored) in a fixed fraction.
The sample at global position ``p`` is a pure function of ``(seed, p)``; step ``s`` uses positions
``[s·B, (s+1)·B)`` and rank ``r`` of ``W`` takes the contiguous slice ``[r·B/W, (r+1)·B/W)`` of it, cut
into ``grad_accum`` micro-batches. The data order therefore does not depend on the number of processes
and a resumed run continues exactly where it stopped.

Resumable: every ``save_every`` steps (and when training ends) the full student state, optimizer,
scheduler, step, data position, loss curve and every rank's RNG states are written atomically to
``OUT/resume/``; rerunning the same command continues from there. The finished result replaces ``OUT``
with a normal vac checkpoint folder (``vac.checkpoint.save``) plus ``distill.json`` and ``loss.png``.

Distributed: run the same code under ``torchrun --nproc_per_node N``: DDP (gloo on CPU, nccl on GPUs),
or with ``fsdp=True`` torch's FSDP2 ``fully_shard`` on every decoder layer and then the root. The
teacher is replicated on every rank (it only runs forward, under ``no_grad``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_write, write_json
from ..cache import load_entry
from ..checkpoint.hf.modeling_vac import LowRankLinear
from ..config import DistillConfig
from ..errors import VacError
from ..faults import kill_point
from ..models.families import arch_for
from .data import DataMix
from .loss import head_kd_loss, top_logits

# ============================================================================ teacher


class TopKCache:
    """Per-sample top-k teacher logits on disk (see the module docstring for the exact KL)."""

    def __init__(self, root: str | os.PathLike, k: int, teacher_id: str,
                 load_teacher: Callable[[], nn.Module] | None = None):
        self.root, self.k, self.teacher_id = Path(root), k, teacher_id
        self._load, self._teacher = load_teacher, None
        self.hits = self.misses = 0
        meta_path = self.root / "meta.json"
        meta = {"teacher": teacher_id, "k": k, "format": "values float16, indices int32, [seq_len-1, k]"}
        old = load_entry(meta_path, lambda p: json.loads(p.read_text()))
        if isinstance(old, dict):
            if (old.get("teacher"), old.get("k")) != (teacher_id, k):
                raise VacError(f"teacher cache {self.root} holds teacher {old.get('teacher')} with k={old.get('k')}, "
                               f"not {teacher_id} with k={k}; use another folder")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(meta_path, meta)

    def _path(self, ids: torch.Tensor, mask: torch.Tensor) -> Path:
        key = hashlib.sha256(ids.numpy().astype(np.int64).tobytes() + mask.numpy().tobytes()).hexdigest()
        return self.root / key[:2] / f"{key[2:40]}.pt"

    @property
    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._teacher = self._load()
        return self._teacher

    def get(self, ids: torch.Tensor, mask: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values float32, indices long)`` [b, L-1, k] for a batch. Misses are computed with the teacher
        and written when the cache has a loader (:func:`fill_teacher_cache`); without one (training)
        a miss is a one-line error: training never loads the teacher behind the user's back."""
        ids, mask = ids.cpu(), mask.cpu()
        paths = [self._path(ids[i], mask[i]) for i in range(ids.shape[0])]
        entries: list = [None] * len(paths)
        missing = []
        for i, path in enumerate(paths):
            entry = load_entry(path, lambda p: torch.load(p, weights_only=True))
            if _valid_entry(entry, ids.shape[1] - 1, self.k):
                entries[i] = entry
                self.hits += 1
            else:
                missing.append(i)
        if missing and self._load is None:
            raise VacError(f"teacher cache {self.root} has no entry for {len(missing)} of this batch's {len(paths)} "
                           "samples: fill it first with the same command and --cache-teacher-only")
        if missing:
            self.misses += len(missing)
            teacher = self.teacher
            with torch.no_grad():
                values, indices = top_logits(_final_hidden(teacher, ids[missing].to(device)),
                                             teacher.get_output_embeddings(), self.k, softcap=_softcap(teacher))
            for j, i in enumerate(missing):
                entry = (values[j].half().cpu(), indices[j].int().cpu())
                buffer = io.BytesIO()
                torch.save(entry, buffer)
                atomic_write(paths[i], buffer.getvalue())
                entries[i] = entry
        values = torch.stack([e[0] for e in entries]).float().to(device)
        indices = torch.stack([e[1] for e in entries]).long().to(device)
        return values, indices


def fill_teacher_cache(
    teacher: nn.Module | Callable[[], nn.Module],
    mix: DataMix,
    cfg: DistillConfig,
    root: str | os.PathLike,
    *,
    teacher_id: str = "teacher",
    env: Dist | None = None,
    progress: bool = True,
) -> dict:
    """Run the teacher once over every batch a ``run_distill`` with the same ``mix`` and ``cfg`` will
    train on (``cfg.steps`` steps; each rank its slice under torchrun) and write their top-k logits
    to the cache ``root``; entries already there are kept. Returns what it did."""
    from tqdm.auto import tqdm

    cfg.check()
    env = env or init_distributed()
    per_rank, micro = _shares(mix, cfg, env)
    cache = TopKCache(root, cfg.top_k, teacher_id, _teacher_loader(teacher, env.device))
    started = time.perf_counter()
    lo = env.rank * per_rank
    for step in tqdm(range(cfg.steps), desc="teacher cache", unit="step", disable=not (progress and env.main)):
        ids, mask = mix.batch(step * cfg.batch_size, cfg.batch_size)
        for m in range(cfg.grad_accum):  # the training micro-batches: the teacher's memory is one of them
            rows = slice(lo + m * micro, lo + (m + 1) * micro)
            cache.get(ids[rows], mask[rows], env.device)
    counts = env.gather((cache.hits, cache.misses))
    return {"dir": str(cache.root), "teacher": teacher_id, "k": cfg.top_k, "steps": cfg.steps,
            "samples": cfg.steps * cfg.batch_size, "written": sum(c[1] for c in counts),
            "already_cached": sum(c[0] for c in counts), "seconds": time.perf_counter() - started,
            "teacher_loaded": cache._teacher is not None}


def _teacher_loader(teacher, device, vocab: int | None = None, shard=None) -> Callable[[], nn.Module]:
    """A zero-argument function that loads ``teacher`` (a model or a zero-argument loader) once, on
    ``device``, in eval mode with frozen parameters, checking its vocabulary against ``vocab``;
    ``shard(model)``: then sharded across the ranks (FSDP2, as the student)."""
    load = teacher if callable(teacher) and not isinstance(teacher, nn.Module) else (lambda: teacher)
    box: list = []

    def get() -> nn.Module:
        if not box:
            model = load()
            if model is None:
                raise VacError("teacher logits are needed but no teacher was given")
            model.to(device).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            if vocab is not None and model.config.vocab_size != vocab:
                raise VacError(f"teacher vocabulary ({model.config.vocab_size}) differs from the student's ({vocab})")
            box.append(shard(model) if shard is not None and not _is_sharded(model) else model)
        return box[0]

    return get


def _shares(mix: DataMix, cfg: DistillConfig, env: Dist) -> tuple[int, int]:
    """Samples per rank and per micro-batch of each step's global batch (checked to split evenly)."""
    if mix.seq_len != cfg.seq_len:
        raise VacError(f"data windows hold {mix.seq_len} tokens, --seq-len is {cfg.seq_len}")
    per_rank, rest = divmod(cfg.batch_size, env.world)
    micro, rest2 = divmod(per_rank, cfg.grad_accum)
    if rest or rest2 or micro == 0:
        raise VacError(f"--batch-size {cfg.batch_size} must split evenly into {env.world} processes × "
                       f"{cfg.grad_accum} micro-batches")
    return per_rank, micro


def _valid_entry(entry, positions: int, k: int) -> bool:
    """A cached (values, indices) pair of the expected shapes (anything else is recomputed)."""
    return (isinstance(entry, tuple) and len(entry) == 2 and all(isinstance(t, torch.Tensor) for t in entry)
            and tuple(entry[0].shape) == tuple(entry[1].shape) == (positions, k))


# ============================================================================ parameter groups


def classify_parameters(model: nn.Module) -> dict[str, str]:
    """``{parameter name: group}`` with groups 'attn', 'mlp', 'head', 'norms', 'embeddings', 'other'.

    Linears of the decoder layers (LowRankLinear factors and dense linears alike, with their biases)
    go to their component ('attn' or 'mlp'); a factorized lm_head is 'head'; a dense lm_head and the
    token embeddings are 'embeddings'; norm weights are 'norms'.
    """
    arch = arch_for(model)
    modules = dict(model.named_modules())
    groups = {}
    for name, _ in model.named_parameters():
        module_path = name.rpartition(".")[0]
        owner = module_path
        parent = module_path.rpartition(".")[0]
        if module_path.rpartition(".")[2] in ("down", "up") and isinstance(modules.get(parent), LowRankLinear):
            owner = parent
        module = modules[owner]
        group = "other"
        if isinstance(module, (nn.Linear, LowRankLinear)):
            if owner.startswith(arch.layers + "."):
                try:
                    group = arch.component(owner)
                except VacError:
                    group = "other"
            elif owner == arch.head:
                group = "head" if isinstance(module, LowRankLinear) else "embeddings"
        elif isinstance(module, nn.Embedding):
            group = "embeddings"
        elif "norm" in type(module).__name__.lower():
            group = "norms"
        groups[name] = group
    return groups


def group_lrs(cfg: DistillConfig) -> dict[str, float | None]:
    """Learning rate per group (None: frozen)."""
    return {
        "attn": cfg.lr * cfg.attn_lr_mult,
        "mlp": cfg.lr,
        "head": cfg.lr,
        "norms": cfg.lr if cfg.train_norms else None,
        "embeddings": cfg.lr if cfg.train_embeddings else None,
        "other": None,
    }


def freeze_(model: nn.Module, cfg: DistillConfig) -> dict[str, str]:
    """Set ``requires_grad`` by group; returns the classification."""
    classes = classify_parameters(model)
    lrs = group_lrs(cfg)
    for name, param in model.named_parameters():
        param.requires_grad_(lrs[classes[name]] is not None)
    return classes


def param_groups(model: nn.Module, classes: dict[str, str], cfg: DistillConfig) -> list[dict]:
    """Optimizer groups of the (possibly wrapped) model, named by group and by weight decay."""
    lrs = group_lrs(cfg)
    found: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        name = name.removeprefix("module.")
        group = classes[name]
        if lrs[group] is None or not param.requires_grad:
            continue
        decay = cfg.weight_decay > 0 and group in ("attn", "mlp", "head") and name.endswith(".weight")
        found.setdefault((group, decay), []).append(param)
    return [
        {"name": group, "params": params, "lr": lrs[group], "weight_decay": cfg.weight_decay if decay else 0.0}
        for (group, decay), params in sorted(found.items())
    ]


def lr_lambda(cfg: DistillConfig, plan: dict) -> Callable[[int], float]:
    """Linear warmup over ``cfg.warmup`` steps, then cosine from 1 to ``min_lr_ratio`` at ``plan['steps']``."""

    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        span = max(1, plan["steps"] - cfg.warmup)
        progress = min(1.0, (step - cfg.warmup) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ============================================================================ distributed helpers


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def agree(self, obj):
        """Rank 0's value of ``obj`` on every rank."""
        if not self.on:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init_distributed(device: str | None = None) -> Dist:
    """Join the torchrun process group (if WORLD_SIZE > 1) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if device and device != "cpu" and not torch.cuda.is_available():
        raise VacError(f"--device {device} requested but no GPU is available")
    dev = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
    return Dist(rank, world, local, dev)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ============================================================================ training


@dataclass
class Result:
    report: dict
    model: nn.Module | None  # the trained student on rank 0 (None elsewhere and for FSDP2 runs: read it from the folder)


STATE_DIR = "resume"


def output_state(out: Path, overwrite: bool) -> Path | None:
    """The resume state in ``out`` to continue from, None for a fresh start; refuses other folders."""
    state = out / STATE_DIR / "state.pt"
    if overwrite or not out.exists():
        return None
    if state.is_file():
        return state
    if (out / "distill.json").is_file():
        raise VacError(f"{out} already holds a finished distillation (pass --overwrite to redo it)")
    if any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise VacError(f"output folder {out} already exists (pass --overwrite to replace it)")
    return None


def run_distill(
    student: nn.Module | str | os.PathLike,
    teacher: nn.Module | Callable[[], nn.Module] | None,
    mix: DataMix,
    cfg: DistillConfig,
    out: str | os.PathLike,
    *,
    tokenizer=None,
    eval_windows: torch.Tensor | None = None,
    teacher_cache: str | os.PathLike | None = None,
    teacher_id: str = "teacher",
    run_info: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    save_dtype: torch.dtype | None = None,
    extra_files: dict | None = None,
    env: Dist | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    snapshots: str | os.PathLike | None = None,
) -> Result:
    """Distill ``teacher`` into ``student`` on ``mix`` and save the result as a vac checkpoint at ``out``.

    ``student`` is a model or a checkpoint folder; a folder under ``cfg.fsdp`` with several processes
    is built on meta and each rank loads only its shards (:mod:`vac.recover.sharded`).
    ``teacher`` is a model or a zero-argument loader. With ``teacher_cache`` the KL uses the cached
    top-k logits that :func:`fill_teacher_cache` wrote, ``teacher`` is never loaded (it may be None)
    and a batch missing from the cache stops the run with a one-line error. ``eval_windows`` [n, L] are scored before
    and after (PPL protocol of :mod:`vac.core.evaluate`). Rerunning with the same arguments resumes from the
    last state saved in ``out``. ``on_step(step, record)`` is called after every optimizer step.
    With ``cfg.snapshot_every`` the trainable parameters are written every that many steps to
    ``snapshots/step-NNNNNN.safetensors`` (outside ``out``, which the final save replaces), so the
    quality over the run can be scored afterwards (:func:`load_snapshot`) without spending training time.
    """
    from tqdm.auto import tqdm

    cfg.check()
    env = env or init_distributed()
    out = Path(out)
    if cfg.snapshot_every and snapshots is None:
        raise VacError("--snapshot-every needs --snapshots (the folder the snapshots go to)")
    if snapshots is not None and out.resolve() in (Path(snapshots).resolve(), *Path(snapshots).resolve().parents):
        raise VacError(f"--snapshots {snapshots} is inside --out {out}, which the final save replaces")
    run_info = dict(run_info or {})
    per_rank, micro = _shares(mix, cfg, env)
    resume_path = output_state(out, overwrite)  # every rank checks (the folder is shared)
    # a state that cannot be read is reported and the run starts over (states are written atomically)
    state = load_entry(resume_path, lambda p: torch.load(p, weights_only=False)) if resume_path else None
    if state is not None:
        _check_same_run(state, cfg, run_info, out)

    device = env.device
    sharded = isinstance(student, (str, os.PathLike)) and cfg.fsdp and env.on
    if sharded:
        from .sharded import load_sharded

        student = load_sharded(student, lambda m: shard_model(m, cfg), device)
    elif isinstance(student, (str, os.PathLike)):
        from .. import checkpoint

        student, _ = checkpoint.load(student)
    get_teacher = _teacher_loader(teacher, device, student.config.vocab_size,
                                  shard=(lambda m: shard_model(m, cfg)) if cfg.fsdp and env.on else None)

    # with a cache, training reads teacher logits only from it (filled by fill_teacher_cache)
    cache = TopKCache(teacher_cache, cfg.top_k, teacher_id) if teacher_cache else None
    if cache is None:
        get_teacher()
    env.barrier()

    student.to(device)
    classes = freeze_(student, cfg)
    if cfg.grad_checkpoint:  # transformers' own per-layer checkpointing (non-reentrant torch.utils.checkpoint)
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ppl_before = state["ppl_before"] if state else None
    if state is None and eval_windows is not None and (env.main or sharded):  # sharded: every rank takes part
        ppl_before = _perplexity(student, eval_windows, cfg, progress and env.main)
    student.train()

    model = _wrap(student, cfg, env)
    groups = param_groups(model, classes, cfg)
    if not groups:
        raise VacError("nothing to train: every parameter is frozen")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    plan = {"steps": cfg.steps, "fixed": cfg.max_minutes is None}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, plan))
    step, history, seconds, tokens, scored = 0, [], 0.0, 0, 0
    if state is not None:
        _load_state(model, optimizer, scheduler, state, env, resume_path.parent)
        step, history, seconds = state["step"], state["history"], state["seconds"]
        tokens, scored = state["tokens"], state["scored"]
        plan.update(state["plan"])
    group_names = [g["name"] for g in optimizer.param_groups]
    base = group_names.index("mlp") if "mlp" in group_names else 0
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    head = student.get_output_embeddings()  # applied by the loss, per chunk (the wrappers hold the same module)
    softcap = _softcap(student)

    bar = tqdm(total=plan["steps"], initial=step, desc="distill", unit="step", disable=not (progress and env.main),
               dynamic_ncols=True)
    run_steps, timed_from, next_fit = 0, (0, 0.0), PLAN_FIRST
    while step < plan["steps"]:
        t0 = time.perf_counter()
        ids, mask = mix.batch(step * cfg.batch_size, cfg.batch_size)
        n_scored = int(mask[:, 1:].sum())
        # combine()'s per-token loss of the global batch, times the world size (DDP/FSDP average over ranks)
        kl_weight = cfg.alpha * cfg.temperature**2 * env.world / max(n_scored, 1)
        nll_weight = (1.0 - cfg.alpha) * env.world / max(n_scored, 1)
        lo = env.rank * per_rank
        sums = torch.zeros(3, dtype=torch.float64)
        for m in range(cfg.grad_accum):
            rows = slice(lo + m * micro, lo + (m + 1) * micro)
            x, xm = ids[rows].to(device), mask[rows].to(device)
            sync = m == cfg.grad_accum - 1
            with _no_sync(model, cfg, env, sync), _autocast(cfg, device):
                hidden = _final_hidden(model, x)
                teacher = ({"teacher_topk": cache.get(x, xm, device)} if cache is not None
                           else _teacher_side(get_teacher(), x))
                loss, kl, nll, _ = head_kd_loss(hidden, head, x[:, 1:], xm[:, 1:], cfg.temperature, kl_weight,
                                                nll_weight, chunk=cfg.loss_chunk, softcap=softcap, **teacher)
            loss.backward()
            sums += torch.tensor([kl.item(), nll.item(), float(xm.sum())], dtype=torch.float64)
        if env.on:
            dist.all_reduce(sums)
        grad_norm = _clip(trainable, cfg.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        run_steps += 1
        seconds += time.perf_counter() - t0
        tokens += int(sums[2])
        scored += n_scored
        kl_mean, nll_mean = float(sums[0]) / max(n_scored, 1), float(sums[1]) / max(n_scored, 1)
        record = {
            "step": step, "loss": cfg.alpha * cfg.temperature**2 * kl_mean + (1 - cfg.alpha) * nll_mean,
            "kl": kl_mean, "nll": nll_mean, "lr": optimizer.param_groups[base]["lr"],
            "grad_norm": grad_norm, "tokens": tokens, "seconds": round(seconds, 3),
        }
        history.append(record)
        if run_steps == 1:  # the first step of a process is slower (allocations, DDP buckets): not timed
            timed_from = (run_steps, seconds)
        if not plan["fixed"] and run_steps >= min(next_fit, plan["steps"]):
            plan["steps"] = env.agree(_planned_steps(cfg, step, seconds, timed_from[1], run_steps - timed_from[0]))
            timed_from, next_fit = (run_steps, seconds), run_steps + PLAN_EVERY
            plan["fixed"] = plan["steps"] - step < PLAN_EVERY  # the last stretch keeps its schedule
            bar.total = plan["steps"]
            bar.refresh()
        if cfg.max_minutes is not None and env.agree(seconds > cfg.max_minutes * 60):
            plan["steps"], plan["fixed"] = step, True  # hard stop: over the time budget
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                        tok_s=f"{float(sums[2]) / max(time.perf_counter() - t0, 1e-9):.0f}")
        if on_step is not None:
            on_step(step, record)
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            _snapshot(student, Path(snapshots), step, env)
        if step % cfg.save_every == 0 or step >= plan["steps"]:
            _save_state(out, model, optimizer, scheduler, env, {
                "step": step, "position": step * cfg.batch_size, "history": history, "seconds": seconds,
                "tokens": tokens, "scored": scored, "plan": plan, "ppl_before": ppl_before,
                "config": cfg.defining(), "run": run_info,
            })
    bar.close()

    # FSDP2: evaluated by all ranks and saved a layer at a time (vac.recover.sharded.save_sharded);
    # otherwise rank 0 holds the whole trained student
    sharded = env.on and _is_sharded(model)
    trained = None if sharded or not env.main else student
    result_model = None
    report = None
    if sharded and eval_windows is not None:
        model.eval()
        ppl_after = _perplexity(model, eval_windows, cfg, progress and env.main)
    if env.main:
        if trained is not None:
            trained.eval()
            ppl_after = _perplexity(trained, eval_windows, cfg, progress) if eval_windows is not None else None
        elif eval_windows is None:
            ppl_after = None
        report = {
            **run_info,
            "config": asdict(cfg),
            "world_size": env.world,
            "device": str(device),
            "ppl_before": ppl_before,
            "ppl_after": ppl_after,
            "steps": step,
            "tokens": tokens,
            "scored_tokens": scored,
            "minutes": seconds / 60,
            "tokens_per_second": tokens / seconds if seconds else None,
            "mix": mix.describe(),
            "param_groups": [
                {"name": g["name"], "lr": g["initial_lr"], "weight_decay": g["weight_decay"],
                 "tensors": len(g["params"]), "params": sum(p.numel() for p in g["params"])}
                for g in optimizer.param_groups
            ],
            "frozen_params": sum(p.numel() for p in student.parameters() if not p.requires_grad),
            "teacher_sharded": cache is None and _is_sharded(get_teacher()),  # FSDP2 over the ranks
            "teacher_cache": None if cache is None else
            {"dir": str(cache.root), "k": cache.k, "hits": cache.hits, "misses": cache.misses},
            "loss": "alpha*T^2*KL + (1-alpha)*NLL, both averaged over the scored tokens of the global batch"
            + ("; KL on the renormalized teacher top-k support" if cache is not None else "; full-vocabulary KL"),
            "loss_curve": history,
        }
        files = dict(extra_files or {})
        files["distill.json"] = report
        summary = {k: report[k] for k in ("ppl_before", "ppl_after", "steps", "tokens", "minutes")}
        summary |= {"teacher": run_info.get("teacher"), "details": "distill.json"}
        if isinstance(files.get("report.json"), dict):  # the student's compression report, extended
            files["report.json"] = {**files["report.json"], "distill": summary}
        else:
            files["report.json"] = report
        files["loss.png"] = loss_plot(history, f"distill {run_info.get('student', '')}".strip())
        if trained is not None:
            from .. import checkpoint

            for p in trained.parameters():
                p.requires_grad_(True)
            checkpoint.save(trained, tokenizer, out, overwrite=True, dtype=save_dtype, extra=files)
            result_model = trained
    if sharded:
        from .sharded import save_sharded

        save_sharded(model, tokenizer, out, env, dtype=save_dtype, extra=files if env.main else None)
    env.barrier()
    return Result(report, result_model)


def _snapshot(student: nn.Module, folder: Path, step: int, env: Dist) -> None:
    """The trainable parameters after ``step``, fp32, one safetensors file written atomically by rank 0
    (FSDP2: each parameter gathered by every rank, one at a time)."""
    from safetensors.torch import save
    from torch.distributed.tensor import DTensor

    tensors = {}
    for name, p in student.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p  # a collective: every rank calls it
            if env.main:
                tensors[name] = full.detach().float().cpu().contiguous()
    if env.main:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"step-{step:06d}.safetensors", save(tensors))


def load_snapshot(student: nn.Module, path: str | os.PathLike) -> int:
    """Copies a :func:`_snapshot` file's parameters into ``student``; returns its step."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    params = dict(student.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise VacError(f"{path} holds {missing[0]}, which this model does not have")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return int(Path(path).stem.split("-")[-1])


def _check_same_run(state: dict, cfg: DistillConfig, run_info: dict, out: Path) -> None:
    old, new = state["config"], cfg.defining()
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise VacError(f"{out} holds an unfinished run with {key}={old.get(key)}, not {new.get(key)}; "
                           "rerun the same command to resume it, or pass --overwrite to start over")
    for key in sorted(set(state.get("run", {})) | set(run_info)):
        if key in ("command",):
            continue
        if state.get("run", {}).get(key) != run_info.get(key):
            raise VacError(f"{out} holds an unfinished run with another {key}; "
                           "rerun the same command to resume it, or pass --overwrite to start over")


# Under --max-minutes the schedule's length is fitted to the budget after the run's first PLAN_FIRST
# steps (timing all but the first, slower one: allocations, DDP buckets), then again every PLAN_EVERY
# steps from the pace of the steps since (a shared CPU's pace drifts within a run), until
# fewer than PLAN_EVERY steps are left
PLAN_FIRST, PLAN_EVERY = 6, 24


def _planned_steps(cfg: DistillConfig, step: int, seconds: float, timed_from: float, timed_steps: int) -> int:
    """The schedule length that fits ``max_minutes`` at the speed of the last ``timed_steps`` steps
    (``seconds``: training time so far, ``timed_from``: the training time before those steps)."""
    per_step = (seconds - timed_from) / timed_steps if timed_steps > 0 else seconds
    remaining = cfg.max_minutes * 60 - seconds  # type: ignore[operator]
    return int(min(cfg.steps, max(step, step + remaining // max(per_step, 1e-9))))


def _final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The final (normed) hidden states [b, L-1, H] that predict tokens 1..L-1, through the model's
    (or its DDP/FSDP wrapper's) forward; the head runs on one position only (``logits_to_keep=1``): the
    loss applies it per chunk (:func:`vac.recover.loss.head_kd_loss`)."""
    out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1][:, :-1]


def _teacher_side(teacher: nn.Module, ids: torch.Tensor) -> dict:
    """head_kd_loss's teacher arguments for a live teacher: its final hidden states and its head."""
    with torch.no_grad():
        return {"teacher_hidden": _final_hidden(teacher, ids), "teacher_head": teacher.get_output_embeddings(),
                "teacher_softcap": _softcap(teacher)}


def _softcap(model: nn.Module) -> float | None:
    """The soft cap applied to the head's output (Gemma 2/3's ``final_logit_softcapping``), or None."""
    return getattr(model.config, "final_logit_softcapping", None) or None


def _perplexity(model, windows, cfg, progress) -> dict:
    from ..core.evaluate import perplexity

    with _autocast(cfg, next(model.parameters()).device):
        return perplexity(model, windows, progress=progress)


@contextlib.contextmanager
def _autocast(cfg: DistillConfig, device):
    """bf16 autocast for ``--bf16`` without FSDP (with it, the MixedPrecisionPolicy casts)."""
    device = torch.device(device)
    if cfg.bf16 and not cfg.fsdp:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def _wrap(student: nn.Module, cfg: DistillConfig, env: Dist) -> nn.Module:
    if (not env.on and not cfg.fsdp) or _is_sharded(student):
        return student
    if cfg.fsdp:
        if not env.on:
            raise VacError("--fsdp needs several processes: run under torchrun --nproc_per_node N")
        return shard_model(student, cfg)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(student, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, cfg: DistillConfig) -> nn.Module:
    """FSDP2 ``fully_shard`` on every decoder layer, then the root; ``--bf16``: a MixedPrecisionPolicy
    (parameters all-gathered in bf16, gradients reduced in fp32, master weights fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg.bf16 else None
    kw = {"mp_policy": policy} if policy is not None else {}
    for layer in model.get_submodule(arch_for(model).layers):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


@contextlib.contextmanager
def _no_sync(model, cfg: DistillConfig, env: Dist, sync: bool):
    """Skip the gradient all-reduce on all micro-batches but the last of a step."""
    if not env.on or sync:
        if cfg.fsdp:
            model.set_requires_gradient_sync(True)
        yield
    elif cfg.fsdp:
        model.set_requires_gradient_sync(False)
        yield
    else:
        with model.no_sync():
            yield


def _clip(params: list, max_norm: float) -> float:
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _sd_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _save_state(out: Path, model, optimizer, scheduler, env: Dist, meta: dict) -> None:
    """The resume state in ``out/resume``: an FSDP2 model as a sharded torch.distributed.checkpoint
    (each rank writes its own shards; loadable on any number of ranks), otherwise one ``state.pt``
    gathered on rank 0. Either way the folder is replaced in one rename once complete."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from ..atomic import atomic_dir, replace_dir

    sharded = env.on and _is_sharded(model)
    rngs = env.gather(_rng_state())
    progress = json.dumps({k: meta[k] for k in ("step", "position", "tokens")})
    if sharded:
        import torch.distributed.checkpoint as dcp

        tmp = out / f".{STATE_DIR}.dcp-tmp"
        if env.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        env.barrier()
        dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=str(tmp / "dcp"))
        env.barrier()
        if env.main:
            torch.save({**meta, "scheduler": scheduler.state_dict(), "rng": rngs, "world_size": env.world,
                        "sharded": True}, tmp / "state.pt")
            (tmp / "progress.json").write_text(progress)
            replace_dir(tmp, out / STATE_DIR, overwrite=True)
            kill_point("distill-state")
        env.barrier()
        return
    options = _sd_options(cpu_offload=True) if env.on else _sd_options()
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options)
    if env.main:
        state = {**meta, "model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                 "rng": rngs, "world_size": env.world}
        out.mkdir(parents=True, exist_ok=True)
        with atomic_dir(out / STATE_DIR, overwrite=True) as tmp:
            torch.save(state, tmp / "state.pt")
            (tmp / "progress.json").write_text(progress)
        kill_point("distill-state")
    env.barrier()


def _load_state(model, optimizer, scheduler, state: dict, env: Dist, folder: Path) -> None:
    """Restore what :func:`_save_state` wrote (a sharded state on any number of ranks, FSDP or not)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if state.get("sharded"):
        import torch.distributed.checkpoint as dcp

        # this run's own layout (sharded or whole tensors) as the template; DCP reshards into it
        target = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(target, checkpoint_id=str(folder / "dcp"))
        set_model_state_dict(model, target["model"])
        set_optimizer_state_dict(model, optimizer, target["optimizer"])
    else:
        set_model_state_dict(model, state["model"], options=_sd_options())
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_sd_options())
    scheduler.load_state_dict(state["scheduler"])
    if state.get("world_size") == env.world:
        _set_rng_state(state["rng"][env.rank])


def loss_plot(history: list[dict], title: str) -> bytes:
    """PNG of the loss, KL and NLL per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    for key in ("loss", "kl", "nll"):
        ax.plot(steps, [h[key] for h in history], label=key, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("per-token value")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def copy_reports(student_dir: Path) -> dict:
    """The student folder's report files to carry into the distilled checkpoint."""
    files = {}
    for name in ("report.json", "ranks.png"):
        path = student_dir / name
        if path.is_file():
            files[name] = path.read_bytes() if name.endswith(".png") else json.loads(path.read_text())
    return files


__all__ = [
    "DistillConfig", "TopKCache", "kd_sums", "kd_loss", "combine", "classify_parameters", "param_groups",
    "freeze_", "group_lrs", "lr_lambda", "run_distill", "init_distributed", "Dist", "loss_plot", "copy_reports",
]
