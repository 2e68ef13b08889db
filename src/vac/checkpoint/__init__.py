"""vac checkpoint folders: save atomically, load without ever building the dense model.

A folder holds ``config.json`` (base config + ``vac_ranks`` + ``auto_map``), safetensors weights, the
shipped modeling code (``configuration_vac.py``, ``modeling_vac.py``), the tokenizer and any report
files. It loads with plain ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``,
and without ``trust_remote_code`` once ``vac`` is imported (importing this package registers the vac
classes of every family in :data:`vac.models.families.FAMILIES` with the transformers Auto classes).
The shipped files are rendered for the checkpoint's own family (:func:`shipped_files`), so a Llama
checkpoint does not import any other family's code.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..atomic import atomic_dir
from ..errors import VacError
from ..models.families import FAMILIES, Family, arch_for, family_for
from .hf import configuration_vac, modeling_vac
from .hf.modeling_vac import LowRankLinear, VacModelMixin

_HF = Path(__file__).parent / "hf"
_CLASSES: dict[str, tuple[type, type]] = {}


def _make_classes(family: Family) -> tuple[type, type]:
    """(config class, model class) of the vac checkpoints of ``family``: the shipped mixins on the
    family's HF classes (the same code that :func:`shipped_files` writes into its checkpoints)."""
    import transformers

    base_config = getattr(transformers, family.config_class)
    base_model = getattr(importlib.import_module(family.model_module), family.model_class)
    config = type(f"Vac{family.config_class}", (configuration_vac.VacConfigMixin, base_config),
                  {"model_type": family.vac_model_type, "__module__": configuration_vac.__name__})
    model = type(f"Vac{family.model_class}", (VacModelMixin, base_model),
                 {"config_class": config, "__module__": modeling_vac.__name__})
    return config, model


def _register_all() -> None:
    for name, family in FAMILIES.items():
        try:
            config, model = _make_classes(family)
        except (ImportError, AttributeError):  # a transformers without this family: not supported here
            continue
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModelForCausalLM.register(config, model, exist_ok=True)
        _CLASSES[name] = (config, model)


_register_all()


def vac_classes(model_or_config) -> tuple[type, type]:
    """(config class, model class) of the vac checkpoints of this model's family."""
    family = family_for(model_or_config)
    if family.model_type not in _CLASSES:
        raise VacError(f"this transformers ({__import__('transformers').__version__}) has no {family.model_type} models")
    return _CLASSES[family.model_type]


def shipped_files(family: Family) -> dict[str, str]:
    """The modeling files written into a checkpoint of ``family``: the template lines marked
    ``vac:family`` (written for Llama) renamed to the family's classes."""
    base = FAMILIES["llama"]
    names = [(base.config_class, family.config_class), (base.model_module, family.model_module),
             (base.model_class, family.model_class), (f'"{base.vac_model_type}"', f'"{family.vac_model_type}"')]
    files = {}
    for name in ("configuration_vac.py", "modeling_vac.py"):
        lines = []
        for line in (_HF / name).read_text().splitlines(keepends=True):
            if "# vac:family" in line:
                for old, new in names:
                    line = line.replace(old, new)
            lines.append(line)
        files[name] = "".join(lines)
    return files


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_bytes(path) -> int:
    """Size on disk of the weight files of a model folder."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def write_index(folder: Path) -> None:
    """``model.safetensors.index.json`` of the ``model-*.safetensors`` shards in ``folder`` (the
    layer-streamed writers' shards: one per decoder layer and one for the rest), from their headers."""
    from safetensors import safe_open

    from ..atomic import write_json

    itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    weight_map, total = {}, 0
    for f in sorted(Path(folder).glob("model-*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                weight_map[k] = f.name
                t = sf.get_slice(k)
                total += math.prod(t.get_shape()) * itemsize[t.get_dtype()]
    write_json(Path(folder) / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                               "weight_map": weight_map})


def write_shipped(folder: Path, model) -> None:
    """Write the modeling files of ``model``'s family into a checkpoint folder (after save_pretrained)."""
    for name, text in shipped_files(family_for(model)).items():
        (Path(folder) / name).write_text(text)


def auto_map(family: Family) -> dict[str, str]:
    """config.json's ``auto_map``: the classes of the shipped files (:func:`shipped_files`)."""
    return {"AutoConfig": f"configuration_vac.Vac{family.config_class}",
            "AutoModelForCausalLM": f"modeling_vac.Vac{family.model_class}"}


def rank_map(model) -> dict[str, int]:
    """The ranks of every LowRankLinear in ``model``: {module_path: rank}."""
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def as_vac_model(model):
    """Turn an HF model whose linears were (partly) replaced by LowRankLinear into its vac class,
    in place, so that ``save_pretrained`` writes a vac checkpoint. Returns the model."""
    config_class, model_class = vac_classes(model)
    ranks = rank_map(model)
    base = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "auto_map")}
    base.pop("vac_ranks", None)
    if "lm_head" in ranks:
        base["tie_word_embeddings"] = False
    config = config_class(**base, vac_ranks=ranks)
    config.auto_map = auto_map(family_for(model))
    model.config = config
    model.__class__ = model_class
    return model


def save(model, tokenizer, out, *, overwrite=False, dtype: torch.dtype | None = None, extra=None):
    """Write ``model`` (with its LowRankLinear layers) as a vac checkpoint folder at ``out``.

    ``extra`` maps file names to str/bytes/dict (dicts are written as JSON), e.g. ``report.json``.
    """
    as_vac_model(model)
    with atomic_dir(out, overwrite) as tmp:
        if dtype is not None and dtype != model.dtype:
            model = model.to(dtype)
        model.save_pretrained(tmp)
        write_shipped(tmp, model)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_extra(tmp, extra)
    return Path(out)


def write_extra(folder: Path, extra: dict | None) -> None:
    """Files beside the weights: name → str, bytes or dict (written as JSON)."""
    for name, content in (extra or {}).items():
        path = Path(folder) / name
        if isinstance(content, dict):
            path.write_text(json.dumps(content, indent=2))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def load(path, *, dtype: torch.dtype | None = torch.float32, device: str | None = None):
    """Load a vac checkpoint (or any supported HF folder) and its tokenizer; errors are one line."""
    path = Path(path)
    if not path.is_dir():
        raise VacError(f"no such checkpoint folder: {path}")
    if not (path / "config.json").is_file():
        raise VacError(f"{path} is not a model folder (no config.json)")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, device_map=device, output_loading_info=True
        )
    except VacError:
        raise
    except Exception as exc:  # corrupt json, truncated safetensors, missing shards, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VacError(f"cannot load checkpoint {path}: {first}") from exc
    missing = [k for k in info.get("missing_keys", []) if k != "lm_head.weight" or not _tied(model)]
    if missing:
        raise VacError(f"corrupt checkpoint {path}: {len(missing)} tensors missing (e.g. {missing[0]})")
    arch_for(model)
    tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    model.eval()
    return model, tokenizer


def _tied(model) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
