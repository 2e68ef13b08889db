"""Several processes for one streamed compression (``torchrun --nproc-per-node N -m vac.cli compress``).

Each rank takes a contiguous share of the calibration windows (and of the Fisher windows), runs them
through every layer, and the per-layer sums (XᵀX, |x| sums, token counts, Fisher row/column sums) are
all-reduced, so every rank holds the statistics of all windows. The matrices of a layer are shared out
round-robin: each rank computes the curves and factors of its matrices and broadcasts them, so the SVDs
(the dominant cost) are split too. Rank 0 alone writes files. One process (no process group) is the
same code with a world of one: these functions then do nothing.

``torch.distributed`` itself (gloo on CPUs, NCCL on GPUs) does the communication; FSDP is not needed:
only one layer is ever in memory, and it is the same on every rank.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def launched() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (:func:`launched`); returns the device of this rank
    (``cuda:LOCAL_RANK`` for a CUDA device)."""
    if not launched() or not dist.is_available():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def share(windows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of ``windows`` (all of them in one process)."""
    rank, size = world()
    n = len(windows)
    return windows[rank * n // size:(rank + 1) * n // size]


def owner(index: int) -> int:
    """The rank that computes item ``index`` of a round-robin share."""
    return index % world()[1]


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def all_reduce_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place."""
    if world()[1] > 1:
        for t in tensors:
            dist.all_reduce(t)


def all_reduce_count(n: int, device) -> int:
    if world()[1] == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def reduce_inputs(inputs: dict) -> None:
    """All-reduce a layer's input statistics (each shared group object once)."""
    if world()[1] == 1:
        return
    for stats in {id(s): s for s in inputs.values()}.values():
        all_reduce_(stats.xtx, stats.abs_sum, *([stats.cross] if stats.cross is not None else []))
        stats.tokens = all_reduce_count(stats.tokens, stats.xtx.device)


def reduce_fisher(fisher: dict) -> None:
    """All-reduce Fisher row/column sums and window counts."""
    if world()[1] == 1:
        return
    for f in fisher.values():
        all_reduce_(f.row, f.col)
        f.windows = all_reduce_count(f.windows, f.row.device)


def broadcast(tensors: dict[str, torch.Tensor] | None, src: int, device) -> dict[str, torch.Tensor]:
    """``tensors`` of rank ``src`` on every rank (others pass None); shapes travel first."""
    if world()[1] == 1:
        return tensors
    meta = [{k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} if world()[0] == src else None]
    dist.broadcast_object_list(meta, src)
    out = {}
    for name, (shape, dtype) in meta[0].items():
        t = tensors[name].to(device).contiguous() if world()[0] == src else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src)
        out[name] = t
    return out
