"""Declarative descriptions of the supported decoder families.

Each family says where the decoder layers live and which linears belong to attention and to the MLP,
grouped by the input they read (q/k/v read the same normed hidden state; o reads the attention output;
gate/up read the same normed hidden state; down reads the MLP's inner activation). The algorithm never
spells out module paths itself: it asks an :class:`Arch`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import VacError


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


@dataclass(frozen=True)
class Family:
    """One decoder family: its HF classes (by name, imported only when used) and its layout."""

    model_type: str  # the HF config's model_type
    config_class: str  # importable from ``transformers``
    model_module: str  # the module of its *ForCausalLM
    model_class: str
    arch: Arch

    @property
    def vac_model_type(self) -> str:
        return f"vac_{self.model_type}"


def _family(model_type: str, stem: str, module: str | None = None, **layout) -> Family:
    module = module or model_type.replace("_text", "")
    return Family(model_type, f"{stem}Config" if "_text" not in model_type else f"{stem}TextConfig",
                  f"transformers.models.{module}.modeling_{module}", f"{stem}ForCausalLM",
                  Arch(model_type, **layout))


# The one family table. Llama-style decoders share one layout; they differ in norms, biases, softcaps
# and attention details, which the HF implementation handles and the compression does not need to
# know. Phi-3 fuses q/k/v and gate/up into one linear each.
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    _family("llama", "Llama"),
    _family("mistral", "Mistral"),
    _family("qwen2", "Qwen2"),
    _family("qwen3", "Qwen3"),
    _family("olmo2", "Olmo2"),
    _family("olmo3", "Olmo3"),
    _family("gemma2", "Gemma2"),
    _family("gemma3_text", "Gemma3", "gemma3"),
    _family("phi3", "Phi3", attn_groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",)),
            mlp_groups=(("mlp.gate_up_proj",), ("mlp.down_proj",))),
)}
ARCHS: dict[str, Arch] = {name: f.arch for name, f in FAMILIES.items()}


def family_for(model_or_config) -> Family:
    """The :class:`Family` of a HF model or config (vac checkpoints resolve to their base family)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = str(getattr(config, "model_type", "")).removeprefix("vac_")
    if model_type not in FAMILIES:
        raise VacError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def arch_for(model_or_config) -> Arch:
    """The :class:`Arch` of a HF model or config (vac checkpoints resolve to their base family)."""
    return family_for(model_or_config).arch
