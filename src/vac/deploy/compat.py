"""Patches and private-API uses of other libraries, in one place, with the versions they were written for.

Each entry depends on internals that upstream may change without notice; ``tests/test_compat.py``
checks the contract each one relies on and fails when upstream moves under it.

Written for: transformers 5.24, torch 2.13, torchao 0.18 (pinned in ``pyproject.toml`` where possible).
"""

from __future__ import annotations

import json
import types

import torch.nn.functional as F

WRITTEN_FOR = {"transformers": "5.24", "torch": "2.13", "torchao": "0.18"}


def fast_int8_loading() -> bool:
    """Make ``from_pretrained`` of torchao checkpoints linear in the number of tensors.

    transformers 5.24 rebuilds each int8 tensor with torchao's ``unflatten_tensor_state_dict`` and
    ``is_metadata_torchao`` given the metadata of the *whole* checkpoint; both scan (and JSON-decode)
    every entry on every call, so loading is quadratic in the number of tensors (load times in
    docs/defaults.md). This wraps the two names that
    ``transformers.integrations.torchao`` calls: the validity check is computed once per metadata
    dict, and unflattening gets only the entries of the module at hand. Results are identical; the
    originals still do the work. Idempotent; a no-op if the layout of those modules changed. Returns
    whether the patch is in place.
    """
    try:
        import transformers.integrations.torchao as hf_torchao
    except ImportError:
        return False
    unflatten = getattr(hf_torchao, "unflatten_tensor_state_dict", None)
    is_metadata = getattr(hf_torchao, "is_metadata_torchao", None)
    if getattr(unflatten, "_vac_fast", False):
        return True
    if unflatten is None or is_metadata is None:
        return False
    last: list = []  # [(metadata, valid, {module path: [tensor names]})]

    def index(metadata):
        if not last or last[0][0] is not metadata:
            valid = is_metadata(metadata)
            by_module: dict[str, list[str]] = {}
            if valid:
                for name in json.loads(metadata["tensor_names"]):
                    by_module.setdefault(name.rpartition(".")[0], []).append(name)
            last[:] = [(metadata, valid, by_module)]
        return last[0]

    def fast_is_metadata_torchao(metadata):
        return index(metadata)[1]

    def fast_unflatten_tensor_state_dict(tensors_data_dict, metadata):
        _, valid, by_module = index(metadata)
        if not valid:
            return unflatten(tensors_data_dict, metadata)
        modules = (key.rpartition(".")[0] for key in tensors_data_dict)
        names = list(dict.fromkeys(n for module in modules for n in by_module.get(module, ())))
        return unflatten(tensors_data_dict, {"tensor_names": json.dumps(names), **{n: metadata[n] for n in names}})

    fast_unflatten_tensor_state_dict._vac_fast = True
    hf_torchao.unflatten_tensor_state_dict = fast_unflatten_tensor_state_dict
    hf_torchao.is_metadata_torchao = fast_is_metadata_torchao
    return True


def _low_rank_forward(self, x):
    return F.linear(F.linear(x, self.down.weight), self.up.weight, self.up.bias)


def bind_direct_forward(module) -> None:
    """Rebind a LowRankLinear's ``forward`` (instance attribute) to two direct ``F.linear`` calls,
    skipping the two ``nn.Linear.__call__`` dispatches. Relies on ``nn.Module.__call__`` calling the
    instance's ``forward`` (torch 2.x)."""
    module.forward = types.MethodType(_low_rank_forward, module)


def has_hooks(*modules) -> bool:
    """Whether any module has forward (pre-)hooks, which the direct forward would skip. Reads torch's
    private ``_forward_hooks`` / ``_forward_pre_hooks`` dicts (torch 2.x)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
