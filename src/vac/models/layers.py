"""LowRankLinear and in-place factorization of a model's dense linears."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..checkpoint import as_vac_model
from ..checkpoint.hf.modeling_vac import LowRankLinear
from ..errors import VacError

__all__ = ["LowRankLinear", "factorize_", "svd_factors", "low_rank_params", "max_useful_rank", "restored", "applied"]

# (weight [out, in], rank) -> (up [out, r], down [r, in])
FactorFn = Callable[[str, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def low_rank_params(out_features: int, in_features: int, rank: int) -> int:
    return rank * (out_features + in_features)


def max_useful_rank(out_features: int, in_features: int) -> int:
    """Largest rank whose factor pair holds fewer parameters than the dense matrix."""
    return (out_features * in_features - 1) // (out_features + in_features)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain truncated SVD, the singular values split evenly between the two factors."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def make_low_rank(dense: nn.Linear, up: torch.Tensor, down: torch.Tensor) -> LowRankLinear:
    """A LowRankLinear holding ``up @ down`` in the dense layer's dtype and device."""
    w = dense.weight
    layer = LowRankLinear(
        dense.in_features, dense.out_features, down.shape[0], dense.bias is not None,
        device=w.device, dtype=w.dtype,
    )
    with torch.no_grad():
        layer.down.weight.copy_(down)
        layer.up.weight.copy_(up)
        if dense.bias is not None:
            layer.up.bias.copy_(dense.bias)
    return layer


@torch.no_grad()
def factorize_(model: nn.Module, ranks: Mapping[str, int], factors: FactorFn | None = None) -> nn.Module:
    """Replace, in place, every linear named in ``ranks`` by a LowRankLinear of that rank.

    ``factors(path, weight, rank)`` returns ``(up, down)``; plain truncated SVD by default. The model
    becomes its vac class (saveable as a vac checkpoint). Returns the model.
    """
    factors = factors or (lambda _path, weight, rank: svd_factors(weight, rank))
    for path, rank in ranks.items():
        parent_path, _, name = path.rpartition(".")
        try:
            dense = model.get_submodule(path)
        except AttributeError:
            raise VacError(f"rank map names {path}, which is not a module of this model") from None
        if not isinstance(dense, nn.Linear):
            raise VacError(f"{path} is a {type(dense).__name__}, not a dense nn.Linear")
        if not 1 <= rank <= min(dense.in_features, dense.out_features):
            raise VacError(f"rank {rank} for {path} is outside 1..{min(dense.weight.shape)}")
        up, down = factors(path, dense.weight, int(rank))
        setattr(model.get_submodule(parent_path), name, make_low_rank(dense, up, down))
    return as_vac_model(model)


@contextmanager
def restored(model: nn.Module):
    """Inside the block ``model`` may be compressed in place (linears replaced, class and config turned
    into vac's); on exit it is the dense model again, and the yielded dict holds the modules the block
    put in, by path, for :func:`applied`. Scoring a candidate this way needs the candidate's factors,
    not a copy of the model (``copy.deepcopy`` per candidate was the search's memory)."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    cls, config = model.__class__, model.config
    taken: dict[str, nn.Module] = {}
    try:
        yield taken
    finally:
        for path, dense in linears.items():
            now = model.get_submodule(path)
            if now is not dense:
                taken[path] = now
                model.set_submodule(path, dense)
        model.__class__, model.config = cls, config


@contextmanager
def applied(model: nn.Module, modules: Mapping[str, nn.Module]):
    """``model`` with ``modules`` (from :func:`restored`) in place inside the block, dense again after."""
    with restored(model):
        for path, module in modules.items():
            model.set_submodule(path, module)
        yield as_vac_model(model)
