"""Declarative descriptions of the supported decoder families.

Each family says where the decoder layers live and which linears belong to attention and to the MLP,
grouped by the input they read (q/k/v read the same normed hidden state; o reads the attention output;
gate/up read the same normed hidden state; down reads the MLP's inner activation). The algorithm never
spells out module paths itself: it asks an :class:`Arch`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import VacError


@dataclass(frozen=True)
class Arch:
    family: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    norm: str = "model.norm"
    head: str = "lm_head"
    # groups of linears (relative to a decoder layer) that share one input
    attn_groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
    )
    mlp_groups: tuple[tuple[str, ...], ...] = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        return self.attn_groups + self.mlp_groups

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    def component(self, name: str) -> str:
        """'attn' or 'mlp' for a module path (absolute or relative to its layer)."""
        tail = ".".join(name.split(".")[-2:])
        if any(tail in g for g in self.attn_groups):
            return "attn"
        if any(tail in g for g in self.mlp_groups):
            return "mlp"
        raise VacError(f"{name} is not a decoder linear of {self.family}")

    def kind(self, name: str) -> str:
        """Short matrix type of a module path: 'q', 'k', 'v', 'o', 'gate', 'up', 'down'."""
        return name.rsplit(".", 1)[-1].removesuffix("_proj")

    def layer_path(self, index: int) -> str:
        return f"{self.layers}.{index}"

    def decoder_linears(self, num_layers: int) -> list[str]:
        """Absolute paths of every decoder linear, layer by layer."""
        return [f"{self.layer_path(i)}.{n}" for i in range(num_layers) for n in self.linears]


# Llama-style decoders share one layout; they differ in norms, biases and attention details, which the
# HF implementation handles and the compression does not need to know.
ARCHS: dict[str, Arch] = {
    name: Arch(name) for name in ("llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo3")
}


def arch_for(model_or_config) -> Arch:
    """The :class:`Arch` of a HF model or config (vac checkpoints resolve to their base family)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = str(getattr(config, "model_type", "")).removeprefix("vac_")
    if model_type not in ARCHS:
        raise VacError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ARCHS))}"
        )
    return ARCHS[model_type]
