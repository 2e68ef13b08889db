"""Build a model on the meta device and load only this rank's FSDP2 shards (``vac distill --fsdp``).

Loading a 7B student (17.7 GB in fp32) and teacher (29 GB) whole on every rank before sharding needs
~47 GB per rank of host memory and, moved to the GPU before ``fully_shard``, the same on the GPU.
Here the model is built with empty weights (accelerate's ``init_empty_weights``: buffers such as the
rotary frequencies stay real), sharded (``fully_shard`` per decoder layer, then the root, with the
run's MixedPrecisionPolicy), materialized empty on the rank's device (``to_empty``), and then filled
one parameter at a time: each rank reads from the safetensors files only the rows of its own shard
(``get_slice``; FSDP2 shards dim 0 in ``torch.chunk`` pieces). Peak memory per rank: its shards plus
one shard of one tensor.

Considered: ``torch.distributed.checkpoint.state_dict.set_model_state_dict(full_state_dict=True)``,
which takes each full tensor on every rank and keeps its shard: the full tensor, its copies and the
chunk were about 3.7 full tensors at a time per rank (7B: the 1.6 GB fp32 embedding ≈ 6 GB transient
on each GPU). torchtitan and accelerate broadcast rank 0's full state dict (``broadcast_from_rank0``),
which needs the whole model in rank 0's host memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import VacError


def load_sharded(folder: str | os.PathLike, shard, device, *, frozen: bool = False,
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of ``folder`` (a vac checkpoint or a dense HF folder of safetensors), sharded by
    ``shard(model)`` (e.g. :func:`vac.recover.distill.shard_model`) and loaded shard by shard on ``device``
    in ``dtype`` (fp32: master weights; a frozen teacher may be bf16); ``frozen``: every parameter
    without gradient (a teacher)."""
    from accelerate import init_empty_weights
    from torch.distributed.tensor import DTensor
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..core.stream import ShardReader
    from ..models.families import arch_for

    folder = Path(folder)
    reader = ShardReader(folder)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(not frozen)
    present = set(reader.names())
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in present and not (tied and n == "lm_head.weight")]
    if missing:
        raise VacError(f"{folder} is missing tensor {missing[0]}")
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model = shard(model)
    model.to_empty(device=device)
    embed = f"{arch_for(model).embed}.weight"
    with torch.no_grad():
        for n, b in model.named_buffers():  # to_empty left them uninitialized
            if n in buffers:
                b.copy_(buffers[n].to(device))
        # fully_shard gives a tied head a sharded parameter of its own (as on the path that loads the whole
        # model first): it is loaded from the embedding's tensor
        for name, p in model.named_parameters():
            source = embed if tied and name == "lm_head.weight" and name not in present else name
            local, start = (p.to_local(), _shard_start(p)) if isinstance(p, DTensor) else (p, 0)
            if local.numel():
                reader.copy_rows(source, start, local)
    return model.eval()


def _shard_start(p) -> int:
    """The first row of this rank's shard of a DTensor sharded on dim 0 (FSDP2's ``Shard(0)``), which
    holds ``torch.chunk``'s piece: ceil(rows / ranks) rows per rank, the last ranks fewer or none.
    (torch computes this in ``torch.distributed.tensor._utils``, a private module.)"""
    from torch.distributed.tensor import Replicate, Shard

    start, rows = 0, p.shape[0]
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Replicate):
            continue
        if not (isinstance(placement, Shard) and placement.dim == 0):
            raise VacError(f"cannot load a parameter placed as {p.placements}: only dim-0 shards are read")
        ranks, rank = p.device_mesh.size(dim), p.device_mesh.get_local_rank(dim)
        rows = -(-rows // ranks)  # torch.chunk's piece size at this mesh dimension
        start += rank * rows
    return start


def save_sharded(model: nn.Module, tokenizer, out: str | os.PathLike, env, *, dtype: torch.dtype | None = None,
                 extra: dict | None = None) -> Path:
    """Write an FSDP2-sharded model as a normal checkpoint folder (``vac.checkpoint.load`` reads it), one
    decoder layer at a time: every rank takes part in gathering each full tensor, rank 0 converts it to
    ``dtype`` (default: fp32) and writes the layer's own shard file. Rank 0 holds one layer's tensors,
    never the whole model (gathering the full state dict held it twice at 7B: 2 × 16.5 GiB)."""
    import copy
    import shutil
    import tempfile

    from safetensors.torch import save_file
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from .. import checkpoint
    from ..atomic import ordinary_permissions, replace_dir
    from ..models.families import arch_for

    out, dtype = Path(out), dtype or torch.float32
    for module in model.modules():  # the sharded fp32 parameters registered, not a forward's unsharded ones
        if isinstance(module, FSDPModule):
            module.reshard()
    arch = arch_for(model)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if tied and name == f"{arch.head}.weight":
            continue  # a tied head is saved once, as the embedding (fully_shard gave it a parameter of its own)
        key = name[len(arch.layers) + 1:].split(".", 1)[0] if name.startswith(arch.layers + ".") else "rest"
        groups.setdefault(f"layer-{int(key):05d}" if key != "rest" else "rest", []).append((name, p))
    tmp = None
    if env.main:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for group, params in groups.items():
            tensors = {}
            for name, p in params:
                full = p.full_tensor() if isinstance(p, DTensor) else p  # a collective: every rank calls it
                if env.main:
                    tensors[name] = full.detach().to("cpu", dtype).contiguous()
                del full
            if env.main:
                file = f"model-{group}.safetensors"
                save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
        if env.main:
            checkpoint.write_index(tmp)
            config = copy.deepcopy(model.config)
            config.dtype = dtype
            config.save_pretrained(tmp)
            checkpoint.write_shipped(tmp, model)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            checkpoint.write_extra(tmp, extra)
            ordinary_permissions(tmp)
            replace_dir(tmp, out, overwrite=True)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    env.barrier()
    return out
