"""Build a model on the meta device and load only this rank's FSDP2 shards (``vac distill --fsdp``).

Loading a 7B student (17.7 GB in fp32) and teacher (29 GB) whole on every rank before sharding needs
~47 GB per rank of host memory and, moved to the GPU before ``fully_shard``, the same on the GPU.
Here the model is built with empty weights (accelerate's ``init_empty_weights``: buffers such as the
rotary frequencies stay real), sharded (``fully_shard`` per decoder layer, then the root, with the
run's MixedPrecisionPolicy), materialized empty on the rank's device (``to_empty``), and then filled
one tensor at a time from the memory-mapped safetensors shards: each rank reads a full tensor and
keeps its own shard (``torch.distributed.checkpoint.state_dict.set_model_state_dict`` with
``full_state_dict=True``). Peak memory per rank: its shards plus one full tensor.

torchtitan and accelerate broadcast rank 0's full state dict instead (``broadcast_from_rank0``), which
needs the whole model in rank 0's host memory; reading the shards' files on every rank does not.
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
    ``shard(model)`` (e.g. :func:`vac.recover.distill._shard`) and loaded shard by shard on ``device``
    in ``dtype`` (fp32: master weights; a frozen teacher may be bf16); ``frozen``: every parameter
    without gradient (a teacher)."""
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..core.stream import ShardReader, bounded_heap, trim_heap
    from ..models.families import arch_for

    bounded_heap()  # the full tensors read one by one come from mappings that are returned when freed
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
    with torch.no_grad():
        for n, b in model.named_buffers():  # to_empty left them uninitialized
            if n in buffers:
                b.copy_(buffers[n].to(device))
    options = StateDictOptions(full_state_dict=True, strict=False)
    embed = f"{arch_for(model).embed}.weight"
    # fully_shard gives a tied head a sharded parameter of its own (as on the path that loads the whole
    # model first): it is loaded from the embedding's tensor
    for name, _ in model.named_parameters():  # one full tensor in memory at a time; each rank keeps its shard
        source = embed if tied and name == "lm_head.weight" and name not in present else name
        set_model_state_dict(model, {name: reader.get(source).to(device, dtype)}, options=options)
        trim_heap()  # the full tensor's memory goes back now, not when the heap's trim threshold is reached
    return model.eval()
