"""Modeling code of a vac checkpoint (shipped inside every checkpoint; imports only transformers/torch).

The model is its base family's ``*ForCausalLM`` whose dense linears named in ``config.vac_ranks`` are
replaced, at construction, by :class:`LowRankLinear` (``up(down(x))``). ``from_pretrained`` constructs
models on the meta device, so the dense matrices are never allocated: the factors are created empty
and filled straight from the checkpoint. vac writes this file into each checkpoint for that
checkpoint's family only: the lines marked ``vac:family`` name the family (Llama in vac's own copy).
"""

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaForCausalLM  # vac:family

from .configuration_vac import VacLlamaConfig  # vac:family


class LowRankLinear(nn.Module):
    """``W ≈ up.weight @ down.weight``: in → rank → out, the bias (if any) on ``up``."""

    def __init__(self, in_features, out_features, rank, bias=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.up(self.down(x))

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``up @ down`` (merged back, as PEFT layers ``merge``)."""
        w = self.up.weight
        dense = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None,
                          device=w.device, dtype=w.dtype)
        dense.weight.copy_((self.up.weight.float() @ self.down.weight.float()).to(w.dtype))
        if self.up.bias is not None:
            dense.bias.copy_(self.up.bias)
        return dense

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def replace_with_low_rank(model, ranks):
    """Swap each dense linear named in ``ranks`` for an (uninitialized) LowRankLinear of that rank."""
    for path, rank in ranks.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        dense = getattr(parent, name)
        if isinstance(dense, LowRankLinear):
            continue
        weight = dense.weight
        layer = LowRankLinear(
            dense.in_features,
            dense.out_features,
            int(rank),
            bias=dense.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        setattr(parent, name, layer)


class VacModelMixin:
    """Builds the base model, then puts LowRankLinear where ``config.vac_ranks`` says."""

    def __init__(self, config):
        super().__init__(config)
        ranks = config.vac_rank_map()
        if any(p == "lm_head" or p.endswith(".lm_head") for p in ranks):
            config.tie_word_embeddings = False
        replace_with_low_rank(self, ranks)


class VacLlamaForCausalLM(VacModelMixin, LlamaForCausalLM):  # vac:family
    config_class = VacLlamaConfig  # vac:family
