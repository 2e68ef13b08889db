"""Calibration statistics, streamed one decoder layer at a time.

The decoder stack is run layer by layer over all calibration windows: the hidden states entering a
layer are kept, every window passes through that one layer, and the outputs become the next layer's
inputs. Per group of linears that share one input we gather the input covariance XᵀX and the mean
|x| per channel (fp64); per linear the diagonal empirical Fisher of its weight (squared gradient of
each window's mean LM loss), reduced to row and column sums, from a backward pass that also walks the
layers one at a time, recomputing each layer's forward from its saved input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..models.families import Arch, arch_for


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the call's keyword arguments and passes through."""

    def __init__(self, store: list, index: int):
        super().__init__()
        self.store, self.index = store, index

    def forward(self, hidden_states, *args, **kwargs):
        self.store[self.index] = kwargs
        return hidden_states


class LayerStream:
    """Runs a model's decoder layers one at a time: ``embed`` → ``layer(i, ...)`` ×L → ``head``."""

    def __init__(self, model: nn.Module, arch: Arch | None = None):
        self.model, self.arch = model, arch or arch_for(model)
        self.layers: nn.ModuleList = model.get_submodule(self.arch.layers)
        self._kwargs: dict[tuple[int, int], list[dict]] = {}

    def __len__(self) -> int:
        return len(self.layers)

    def layer_kwargs(self, batch: torch.Tensor) -> list[dict]:
        """The keyword arguments (masks, rotary embeddings...) each layer receives for this shape."""
        key = tuple(batch.shape)
        if key not in self._kwargs:
            store: list = [None] * len(self.layers)
            parent_path, _, name = self.arch.layers.rpartition(".")
            parent = self.model.get_submodule(parent_path)
            setattr(parent, name, nn.ModuleList(_Recorder(store, i) for i in range(len(store))))
            try:
                with torch.no_grad():
                    parent(input_ids=batch, use_cache=False)
            finally:
                setattr(parent, name, self.layers)
            self._kwargs[key] = store
        return self._kwargs[key]

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.get_submodule(self.arch.embed)(batch)

    def layer(self, i: int, hidden: torch.Tensor, batch: torch.Tensor, module=None) -> torch.Tensor:
        """Layer ``i`` (or ``module`` standing in for it) on one batch of hidden states."""
        out = (module or self.layers[i])(hidden, **self.layer_kwargs(batch)[i])
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: logits (soft-capped where the family does, e.g. Gemma-2)."""
        norm = self.model.get_submodule(self.arch.norm)
        logits = self.model.get_submodule(self.arch.head)(norm(hidden))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


def window_loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each window, summed over the windows of the batch."""
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none"
    )
    return nll.view(batch.shape[0], -1).mean(1).sum()


@dataclass
class InputStats:
    """Statistics of the input that a group of linears shares."""

    xtx: torch.Tensor  # [in, in] fp64, sum over tokens of x xᵀ
    abs_sum: torch.Tensor  # [in] fp64, sum over tokens of |x|
    tokens: int = 0
    # [in, in] fp64, sum over tokens of x_dense x̃ᵀ: the same token's input in the dense model (x_dense)
    # and in the partly compressed one (x̃ = x); set only by :func:`layer_pair_stats`
    cross: torch.Tensor | None = None
    # set by a caller that will not read these statistics again: the whitening may then turn xtx into
    # its Cholesky working copy in place (one fewer [in, in] fp64 matrix at the peak)
    disposable: bool = False

    @classmethod
    def empty(cls, dim: int, device=None) -> "InputStats":
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(zeros(dim, dim), zeros(dim))

    def add(self, x: torch.Tensor) -> None:
        """Add a batch: products in fp32 per chunk of tokens (fast), sums accumulated in fp64."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        for chunk in x.split(4096):
            self.xtx.add_(chunk.T @ chunk)  # promoted to fp64 in place: no fp64 copy of the product
        self.abs_sum += x.abs().sum(0).double()
        self.tokens += x.shape[0]

    def add_pair(self, x: torch.Tensor, x_dense: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` together with the dense model's inputs for the same tokens."""
        self.add(x)
        x = x.detach().reshape(-1, x.shape[-1]).float()
        x_dense = x_dense.reshape(-1, x_dense.shape[-1]).float()
        if self.cross is None:
            self.cross = torch.zeros_like(self.xtx)
        for chunk, chunk_dense in zip(x.split(4096), x_dense.split(4096)):
            self.cross.add_(chunk_dense.T @ chunk)


@dataclass
class FisherStats:
    """Diagonal empirical Fisher of a weight, reduced to row (output) and column (input) sums."""

    row: torch.Tensor  # [out] fp64
    col: torch.Tensor  # [in] fp64
    windows: int = 0


@dataclass
class Statistics:
    """All statistics, keyed by absolute module path of each linear."""

    inputs: dict[str, InputStats] = field(default_factory=dict)
    fisher: dict[str, FisherStats] = field(default_factory=dict)


def input_hooks(stream: LayerStream, i: int, stats: dict[str, InputStats]) -> list:
    """Pre-hooks that add the input of each group of linears of layer ``i`` to ``stats`` (one shared
    :class:`InputStats` per group, keyed by each member's path); remove the returned handles."""
    arch, layer, handles = stream.arch, stream.layers[i], []
    for group in arch.groups:
        first = layer.get_submodule(group[0])
        shared = InputStats.empty(first.in_features, first.weight.device)
        for name in group:
            stats[f"{arch.layer_path(i)}.{name}"] = shared
        handles.append(first.register_forward_pre_hook(lambda _m, args, s=shared: s.add(args[0])))
    return handles


@torch.no_grad()
def layer_input_stats(
    stream: LayerStream, i: int, hidden: list[torch.Tensor], batches: list[torch.Tensor]
) -> tuple[dict[str, InputStats], list[torch.Tensor]]:
    """Run every batch through layer ``i``; return its groups' input statistics and the outputs."""
    stats: dict[str, InputStats] = {}
    handles = input_hooks(stream, i, stats)
    try:
        outputs = [stream.layer(i, h, b) for h, b in zip(hidden, batches)]
    finally:
        for handle in handles:
            handle.remove()
    return stats, outputs


@torch.no_grad()
def layer_pair_stats(
    stream: LayerStream,
    i: int,
    hidden: list[torch.Tensor],
    dense_hidden: list[torch.Tensor],
    batches: list[torch.Tensor],
) -> tuple[dict[str, InputStats], list[torch.Tensor]]:
    """Input statistics of layer ``i`` (still dense) over inputs ``hidden`` that passed through
    compressed layers, paired with the dense model's inputs ``dense_hidden`` of the same tokens (for
    the cross term). Returns the statistics and the layer's outputs on ``dense_hidden``."""
    arch, layer = stream.arch, stream.layers[i]
    stats: dict[str, InputStats] = {}
    captured: dict[str, torch.Tensor] = {}
    mode = ["dense"]
    handles = []
    for group in arch.groups:
        first = layer.get_submodule(group[0])
        shared = InputStats.empty(first.in_features, first.weight.device)
        for name in group:
            stats[f"{arch.layer_path(i)}.{name}"] = shared

        def hook(_module, args, s=shared, key=group[0]):
            if mode[0] == "dense":
                captured[key] = args[0].detach()
            else:
                s.add_pair(args[0], captured.pop(key))

        handles.append(first.register_forward_pre_hook(hook))
    dense_outputs = []
    try:
        for h, hd, b in zip(hidden, dense_hidden, batches):
            mode[0] = "dense"
            dense_outputs.append(stream.layer(i, hd, b))
            mode[0] = "compressed"
            stream.layer(i, h, b)
    finally:
        for handle in handles:
            handle.remove()
    return stats, dense_outputs


def _input_hooks(stream: LayerStream, inputs: dict[str, InputStats], active: list[bool]) -> list:
    """Pre-hooks that add each group's input to ``inputs`` while ``active[0]`` is true."""
    arch, handles = stream.arch, []
    for i, layer in enumerate(stream.layers):
        for group in arch.groups:
            first = layer.get_submodule(group[0])
            shared = InputStats.empty(first.in_features, first.weight.device)
            for name in group:
                inputs[f"{arch.layer_path(i)}.{name}"] = shared

            def hook(_module, args, s=shared):
                if active[0]:
                    s.add(args[0])

            handles.append(first.register_forward_pre_hook(hook))
    return handles


def fisher_stats(
    model: nn.Module,
    windows: torch.Tensor,
    progress: bool = True,
    inputs: dict[str, InputStats] | None = None,
) -> dict[str, FisherStats]:
    """Diagonal empirical Fisher of every decoder linear, one window per backward pass, computed by a
    layer-streamed backward (forward keeps only each layer's input; backward recomputes one layer).
    If ``inputs`` is given, the input statistics of the same windows are gathered into it for free."""
    stream = LayerStream(model)
    active = [False]
    handles = _input_hooks(stream, inputs, active) if inputs is not None else []
    arch, n_layers = stream.arch, len(stream)
    paths = arch.decoder_linears(n_layers)
    linears = {p: model.get_submodule(p) for p in paths}
    result = {
        p: FisherStats(
            torch.zeros(m.out_features, dtype=torch.float64, device=m.weight.device),
            torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device),
        )
        for p, m in linears.items()
    }
    was_training = model.training
    model.eval()
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    for m in linears.values():
        m.weight.requires_grad_(True)
    try:
        for w in tqdm(windows.split(1), desc="fisher", unit="window", disable=not progress):
            with torch.no_grad():
                active[0] = True
                hidden = [stream.embed(w)]
                for i in range(n_layers):
                    hidden.append(stream.layer(i, hidden[-1], w))
                active[0] = False
            top = hidden[-1].detach().requires_grad_(True)
            window_loss(stream.head(top), w).backward()
            grad = top.grad
            for i in reversed(range(n_layers)):
                h = hidden[i].detach().requires_grad_(True)
                stream.layer(i, h, w).backward(grad)
                grad = h.grad
                for name in arch.linears:
                    path = f"{arch.layer_path(i)}.{name}"
                    weight = linears[path].weight
                    g2 = weight.grad.double().square()
                    result[path].row += g2.sum(1)
                    result[path].col += g2.sum(0)
                    result[path].windows += 1
                    weight.grad = None
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return result
