"""How much memory each stage of a streamed compression needs, from the model's shapes and the config.

The same arithmetic as docs/scale.md, written once: the out-of-memory line of ``vac compress`` names
the bytes of the stage it failed in, and ``benchmarks/scale.py`` prints the plan beside the measured
peak. The terms follow the code of :mod:`vac.core.stream`: what is loaded (one decoder layer in fp32;
the embedding for a pass's first step, the head for its last), the hidden states a pass keeps, one layer's fp64 input statistics, and the
transient work of the largest matrix (its Cholesky factor and working copy, the weighted matrix and
its SVD). Estimates, not guarantees: the allocator and the interpreter add a few hundred MB.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.families import Arch

FP32, FP64 = 4, 8


@dataclass(frozen=True)
class Shapes:
    """What the plan reads from a model: hidden size, vocabulary, layer count, head tying, and one
    decoder layer's linears as ``name -> (out, in)`` (groups of linears sharing one input from ``arch``)."""

    hidden: int
    vocab: int
    layers: int
    tied: bool
    linears: dict[str, tuple[int, int]]
    other_params: int  # per layer, outside the linears (norms)
    arch: Arch

    @classmethod
    def of(cls, config, arch: Arch, shape_of) -> "Shapes":
        """From a transformers config and ``shape_of(name) -> (out, in)`` of layer 0's linears."""
        linears = {name: tuple(shape_of(f"{arch.layer_path(0)}.{name}")) for name in arch.linears}
        return cls(config.hidden_size, config.vocab_size, config.num_hidden_layers,
                   bool(getattr(config, "tie_word_embeddings", False)), linears, 4 * config.hidden_size, arch)

    def layer_params(self) -> int:
        return sum(o * i for o, i in self.linears.values()) + self.other_params

    def group_inputs(self) -> list[int]:
        return [self.linears[group[0]][1] for group in self.arch.groups if group[0] in self.linears]


def _math(shapes: Shapes, full_svd: bool) -> int:
    """Peak bytes of one layer's statistics and factorization math, following the streamed passes: the
    groups are done in order and each group's XᵀX is freed after its last matrix; whitening turns the
    XᵀX into its Cholesky working copy and adds the factor; the weighted matrix is built in fp64 (two
    copies at once) and decomposed (``svdvals``: ~2 k² of LAPACK work; the SVD: U, Vᵀ and ~4 k²)."""
    groups = [g for g in shapes.arch.groups if g[0] in shapes.linears]
    remaining = sum(shapes.linears[g[0]][1] ** 2 for g in groups) * FP64
    peak = 0
    for group in groups:
        n_in = shapes.linears[group[0]][1]
        factor = n_in * n_in * FP64
        peak = max(peak, remaining + factor)  # the Cholesky: XᵀX (working copy) + factor
        remaining -= factor  # the working copy is dropped once the factor exists
        for name in group:
            m, n = shapes.linears[name]
            k = min(m, n)
            svd = (m * k + k * n + 4 * k * k) if full_svd else 2 * k * k
            peak = max(peak, remaining + factor + (2 * m * n + svd) * FP64)
    return peak


def stage_bytes(shapes: Shapes, *, windows: int, seq_len: int, fisher_windows: int, batch_size: int,
                offload: bool = False, refine: str = "none", largest_layer: int | None = None,
                held: int = 2) -> dict[str, int]:
    """Bytes needed by each stage of :func:`vac.core.stream.stream_compress` (its peak, without the
    interpreter and libraries, about 0.5 GiB); ``offload``: hidden states in files (``--offload-dir``),
    one batch of them in memory; ``refine``: the refinement's target (:mod:`vac.core.refine`);
    ``largest_layer``: the parameters of the largest decoder layer once compressed (its factors and the
    matrices kept dense, from the rank map); None, before the allocation,
    takes the bound, the dense layer's (no matrix's factors outgrow the matrix: the knapsack keeps it
    dense first), since a global allocation can give one layer far more than 1/ratio of it; ``held``: the
    boundaries one stream of the factorization holds at once (:func:`vac.core.driver.held_boundaries`
    of its layer order: 2 front to back)."""
    h, v, layer = shapes.hidden, shapes.vocab, shapes.layer_params()
    table = v * h * FP32  # the embedding or the head, each loaded only for a pass's first or last step
    boundary = seq_len * h * FP32  # one window's hidden state at one layer boundary
    inner = max(o for o, _ in shapes.linears.values())  # widest activation inside a layer
    acts = seq_len * (4 * inner + 8 * h) * FP32  # one window's activations inside a layer
    stats = sum(n * n * FP64 for n in shapes.group_inputs())
    m, n = max(shapes.linears.values(), key=lambda s: s[0] * s[1])
    grad = m * n * (FP32 + 2 * FP64)  # one weight's gradient, its fp64 square (the others are reduced)
    logits = 3 * seq_len * v * FP32  # logits, softmax, gradient: one window at a time
    compressed = (layer if largest_layer is None else largest_layer) * FP32  # the layer being built
    kept_fisher = 2 if offload else fisher_windows * (shapes.layers + 2)  # boundaries held by the Fisher pass
    per = min(batch_size, windows) if offload else windows  # windows of one boundary in memory
    kept = 2 * per  # hidden states in and out of a layer
    spans = 2 if offload else held  # boundaries one stream of the factorization holds (offload: on disk)
    # refinement: its targets (own: one boundary; dense: the dense stream's), a batch's activations
    # kept for the backward, and the factors' gradients and Adam moments
    targets = {"none": 0, "own": 1, "dense": spans}[refine] * per * boundary
    fit = (2 * batch_size * acts + 3 * compressed) if refine != "none" else 0
    dense = layer * FP32  # one decoder layer in fp32
    return {
        "the Fisher pass": kept_fisher * boundary
        + max(table + logits, dense + max(stats + grad + acts, _math(shapes, full_svd=False))),
        "the allocation curves": kept * boundary
        + max(table, dense + batch_size * acts + max(stats, _math(shapes, full_svd=False))),
        "the factorization": spans * per * boundary + targets
        + max(table, dense + batch_size * acts + compressed + max(stats, _math(shapes, full_svd=True), fit)),
        # the tensors outside the layers read and converted (at most two fp32-sized copies of them)
        "the save": table * (1 if shapes.tied else 2) + dense,
    }


def search_bytes(shapes: Shapes, *, population: int, search_windows: int, calib_windows: int, seq_len: int,
                 fisher_windows: int, batch_size: int, refine: str = "none", held: int = 2) -> dict[str, int]:
    """Bytes needed by each stage of the streamed ``vac search`` (:mod:`vac.search.streamed`); the full
    re-scores are streamed compressions (:func:`stage_bytes`, their largest stage) in any order the
    search visits (``held``: the most boundaries one of them holds)."""
    h, v, layer = shapes.hidden, shapes.vocab, shapes.layer_params()
    table, dense = v * h * FP32, layer * FP32  # the embedding or the head; one decoder layer
    boundary = seq_len * h * FP32
    inner = max(o for o, _ in shapes.linears.values())
    acts = seq_len * (4 * inner + 8 * h) * FP32
    stats = sum(n * n * FP64 for n in shapes.group_inputs())
    factor_set = dense  # one layer's factors at the largest useful rank (each at most the dense size)
    compress = stage_bytes(shapes, windows=calib_windows, seq_len=seq_len, fisher_windows=fisher_windows,
                           batch_size=batch_size, refine=refine, held=held)
    genomes = population * search_windows * boundary  # every genome's hidden states at one boundary
    return {
        "the Fisher pass": compress["the Fisher pass"],
        "the input statistics": 2 * calib_windows * boundary + max(table, dense + batch_size * acts + stats),
        "the factor sets": dense + stats + factor_set + _math(shapes, full_svd=True),
        # a layer: the dense layer, one factor set of it, the low-rank layer being scored (at most the
        # dense layer's size), the genome's outputs beside its inputs; the end: the head and one window's logits
        "the proxy scores": genomes + max(table + 2 * seq_len * v * FP32,
                                          2 * dense + factor_set + search_windows * boundary + acts),
        "the full re-scores": max(compress.values()),
    }


def human(n: int) -> str:
    """``n`` bytes as GiB (one decimal) from 1 GiB up, as MiB below."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
