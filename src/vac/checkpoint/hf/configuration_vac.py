"""Configurations of vac checkpoints (shipped inside every checkpoint; imports only transformers).

A vac checkpoint keeps its base family's configuration and adds ``vac_ranks``: a map from module path
to the rank of the ``LowRankLinear`` that replaces that dense linear. Its ``model_type`` is
``vac_<family>``, so loading it without the shipped code fails loudly instead of silently building a
dense model with random weights.
"""

from transformers import (
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Olmo3Config,
    Qwen2Config,
    Qwen3Config,
)


class VacConfigMixin:
    """``vac_ranks``: {module_path: rank}; ``vac_base_model_type``: the family it was made from."""

    def vac_rank_map(self) -> dict:
        return dict(getattr(self, "vac_ranks", None) or {})


class VacLlamaConfig(VacConfigMixin, LlamaConfig):
    model_type = "vac_llama"


class VacMistralConfig(VacConfigMixin, MistralConfig):
    model_type = "vac_mistral"


class VacQwen2Config(VacConfigMixin, Qwen2Config):
    model_type = "vac_qwen2"


class VacQwen3Config(VacConfigMixin, Qwen3Config):
    model_type = "vac_qwen3"


class VacOlmo2Config(VacConfigMixin, Olmo2Config):
    model_type = "vac_olmo2"


class VacOlmo3Config(VacConfigMixin, Olmo3Config):
    model_type = "vac_olmo3"


VAC_CONFIGS = {
    cls.model_type.removeprefix("vac_"): cls
    for cls in (
        VacLlamaConfig,
        VacMistralConfig,
        VacQwen2Config,
        VacQwen3Config,
        VacOlmo2Config,
        VacOlmo3Config,
    )
}
