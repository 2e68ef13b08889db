"""Configuration of a vac checkpoint (shipped inside every checkpoint; imports only transformers).

A vac checkpoint keeps its base family's configuration and adds ``vac_ranks``: a map from module path
to the rank of the ``LowRankLinear`` that replaces that dense linear. Its ``model_type`` is
``vac_<family>``, so loading it without the shipped code fails loudly instead of silently building a
dense model with random weights. vac writes this file into each checkpoint for that checkpoint's
family only: the lines marked ``vac:family`` name the family (Llama in vac's own copy).
"""

from transformers import LlamaConfig  # vac:family


class VacConfigMixin:
    """``vac_ranks``: {module_path: rank}."""

    def vac_rank_map(self) -> dict:
        return dict(getattr(self, "vac_ranks", None) or {})


class VacLlamaConfig(VacConfigMixin, LlamaConfig):  # vac:family
    model_type = "vac_llama"  # vac:family
