"""Modeling code of vac checkpoints (shipped inside every checkpoint; imports only transformers/torch).

Each class is its base family's ``*ForCausalLM`` whose dense linears named in ``config.vac_ranks`` are
replaced, at construction, by :class:`LowRankLinear` (``up(down(x))``). ``from_pretrained`` constructs
models on the meta device, so the dense matrices are never allocated: the factors are created empty
and filled straight from the checkpoint.
"""

from torch import nn
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.olmo2.modeling_olmo2 import Olmo2ForCausalLM
from transformers.models.olmo3.modeling_olmo3 import Olmo3ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

from .configuration_vac import (
    VacLlamaConfig,
    VacMistralConfig,
    VacOlmo2Config,
    VacOlmo3Config,
    VacQwen2Config,
    VacQwen3Config,
)


class LowRankLinear(nn.Module):
    """``W ≈ up.weight @ down.weight``: in → rank → out, the bias (if any) on ``up``."""

    def __init__(self, in_features, out_features, rank, bias=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.up(self.down(x))

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


def _vac_class(base, config_class):
    class VacForCausalLM(base):
        def __init__(self, config):
            super().__init__(config)
            ranks = config.vac_rank_map()
            if any(p == "lm_head" or p.endswith(".lm_head") for p in ranks):
                config.tie_word_embeddings = False
            replace_with_low_rank(self, ranks)

    VacForCausalLM.config_class = config_class
    VacForCausalLM.__name__ = VacForCausalLM.__qualname__ = "Vac" + base.__name__
    return VacForCausalLM


VacLlamaForCausalLM = _vac_class(LlamaForCausalLM, VacLlamaConfig)
VacMistralForCausalLM = _vac_class(MistralForCausalLM, VacMistralConfig)
VacQwen2ForCausalLM = _vac_class(Qwen2ForCausalLM, VacQwen2Config)
VacQwen3ForCausalLM = _vac_class(Qwen3ForCausalLM, VacQwen3Config)
VacOlmo2ForCausalLM = _vac_class(Olmo2ForCausalLM, VacOlmo2Config)
VacOlmo3ForCausalLM = _vac_class(Olmo3ForCausalLM, VacOlmo3Config)

VAC_MODELS = {
    cls.config_class.model_type.removeprefix("vac_"): cls
    for cls in (
        VacLlamaForCausalLM,
        VacMistralForCausalLM,
        VacQwen2ForCausalLM,
        VacQwen3ForCausalLM,
        VacOlmo2ForCausalLM,
        VacOlmo3ForCausalLM,
    )
}
