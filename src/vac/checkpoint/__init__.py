"""vac checkpoint folders: save atomically, load without ever building the dense model.

A folder holds ``config.json`` (base config + ``vac_ranks`` + ``auto_map``), safetensors weights, the
shipped modeling code (``configuration_vac.py``, ``modeling_vac.py``), the tokenizer and any report
files. It loads with plain ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..arch import arch_for
from ..errors import VacError
from .hf.configuration_vac import VAC_CONFIGS
from .hf.modeling_vac import VAC_MODELS, LowRankLinear

for _family, _config in VAC_CONFIGS.items():
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, VAC_MODELS[_family], exist_ok=True)
    _config.register_for_auto_class("AutoConfig")
    VAC_MODELS[_family].register_for_auto_class("AutoModelForCausalLM")


def rank_map(model) -> dict[str, int]:
    """The ranks of every LowRankLinear in ``model``: {module_path: rank}."""
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def as_vac_model(model):
    """Turn an HF model whose linears were (partly) replaced by LowRankLinear into its vac class,
    in place, so that ``save_pretrained`` writes a vac checkpoint. Returns the model."""
    family = arch_for(model).family
    ranks = rank_map(model)
    base = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "auto_map")}
    base.pop("vac_ranks", None)
    if "lm_head" in ranks:
        base["tie_word_embeddings"] = False
    config = VAC_CONFIGS[family](**base, vac_ranks=ranks)
    model.config = config
    model.__class__ = VAC_MODELS[family]
    return model


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temp folder beside ``out``; on success it replaces ``out`` in one rename."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise VacError(f"output folder {out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(model, tokenizer, out, *, overwrite=False, dtype: torch.dtype | None = None, extra=None):
    """Write ``model`` (with its LowRankLinear layers) as a vac checkpoint folder at ``out``.

    ``extra`` maps file names to str/bytes/dict (dicts are written as JSON), e.g. ``report.json``.
    """
    as_vac_model(model)
    with atomic_dir(out, overwrite) as tmp:
        if dtype is not None and dtype != model.dtype:
            model = model.to(dtype)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra or {}).items():
            path = tmp / name
            if isinstance(content, dict):
                path.write_text(json.dumps(content, indent=2))
            elif isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
    return Path(out)


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
