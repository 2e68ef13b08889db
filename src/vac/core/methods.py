"""Weighted low-rank factorization: one mechanism, a registry of methods.

Every method minimizes ``‖Dₗ (W − W′) R‖_F`` over rank-r ``W′`` for a diagonal left weighting ``Dₗ``
(output channels) and a right transform ``R`` (input side): ``W′ = Dₗ⁻¹ [Dₗ W R]ᵣ R⁻¹``. The
discarded squared singular values of ``Dₗ W R`` are the method's error at every rank at once.

- ``svd``: Dₗ = I, R = I.
- ``fwsvd``: Dₗ = (Fisher row sums)^e (Hsu et al. 2022 use e = 1/2).
- ``asvd``: R = diag(mean |x|)^α (Yuan et al. 2023).
- ``whiten``: R = chol(XᵀX), adaptively regularized (SVD-LLM, Wang et al. 2024): the error is the
  layer's output error on the calibration inputs.
- ``vac``: whitening plus Dₗ = (Fisher output sensitivity)^(e/2): output error weighted by how much
  each output channel moves the loss, so the error is an estimate of the loss increase.

A method is one decorated function in this file (:func:`register_method`, the shape of torchao's
``register_quantize_module_handler``): it turns one matrix's statistics into a :class:`Weighting`, and
its registration says which statistics it needs, whether it whitens (so ``--correct`` applies) and its
defaults (allocation, sequential, Fisher exponent, attention split share).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import VacError
from .calibrate import FisherStats, InputStats

# defaults a method does not set itself: uniform ranks from dense statistics, FWSVD's √ of Fisher sums
BASE_DEFAULTS = {"allocation": "uniform", "sequential": False, "fisher_exponent": 1 / 2, "refine": "none"}


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: ``weighting(inputs, fisher, exponent, alpha) -> Weighting`` and what it needs."""

    name: str
    weighting: Callable
    needs: frozenset[str]  # statistics it reads: "inputs" (XᵀX, |x|), "fisher"
    whitening: bool = False  # its right transform is chol(XᵀX): --correct can fit dense outputs
    defaults: dict = field(default_factory=dict)  # StrategyConfig fields it sets when they are None
    attn_share: float | None = None  # default attention split share (attn_ratio = 1 + (ratio − 1)·share)


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, needs=(), whitening=False, attn_share=None, **defaults):
    """Decorator: register ``fn(inputs, fisher, fisher_exponent, asvd_alpha) -> Weighting`` as ``name``."""

    def deco(fn):
        METHODS[name] = MethodSpec(name, fn, frozenset(needs), whitening, {**BASE_DEFAULTS, **defaults}, attn_share)
        return fn

    return deco


def cholesky_adaptive(xtx: torch.Tensor, tokens: int = 1, in_place: bool = False) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of XᵀX/``tokens`` (fp64), adding the smallest ridge λ·mean(diag) that works.

    One working copy of the matrix besides the factor (``in_place``: ``xtx`` itself, fp64, overwritten):
    the ridge is written into its diagonal, no identity matrix (at an MLP width of 11008 each of these
    is 0.97 GB, docs/scale.md)."""
    a = xtx.div_(tokens) if in_place and xtx.dtype == torch.float64 else xtx.double().div(tokens)
    diag = a.diagonal().clone()
    scale = diag.mean().clamp_min(1e-30)
    for ridge in (0.0, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        a.diagonal().copy_(diag + ridge * scale)
        factor, info = torch.linalg.cholesky_ex(a)
        if info.item() == 0 and factor.diagonal().min() > 0:
            return factor, ridge
        del factor
    raise VacError("the input covariance of a layer could not be factorized even with a large ridge "
                   "(non-finite activations? check the model and the calibration text)")


APPLY_ROWS = 1024  # rows of the weighted matrix multiplied by R at a time (32 MB of fp64 at width 4096)


@dataclass
class Weighting:
    """``left`` [out] diagonal (or None), ``right`` [in, in] lower-triangular or [in] diagonal (or None)."""

    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    ridge: float = 0.0
    # [in, in]: when set, the matrix decomposed is Dₗ W ``target`` instead of Dₗ W R (see
    # :func:`weighting`: the least-squares fit of dense outputs from compressed inputs)
    target: torch.Tensor | None = None

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """Dₗ W R in fp64, built in one [out, in] buffer: the scalings in place and the product with
        R by blocks of rows (a whole ``a @ R`` would hold two such matrices, 0.36 GB each at 11008×4096)."""
        a = weight.double()
        if a is weight:  # already fp64: work on a copy
            a = a.clone()
        if self.left is not None:
            a.mul_(self.left[:, None])
        if self.target is not None:
            return a @ self.target
        if self.right is not None and self.right.dim() == 1:
            a.mul_(self.right[None, :])
        elif self.right is not None:
            for rows in a.split(APPLY_ROWS):
                rows.copy_(rows @ self.right)
        return a

    def factors(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int):
        """(up, down) of ``W′ = Dₗ⁻¹ U_r S_r V_rᵀ R⁻¹`` from the SVD of the weighted matrix."""
        root = s[:rank].sqrt()
        up = u[:, :rank] * root
        down = root[:, None] * vh[:rank]
        if self.left is not None:
            up = up / self.left[:, None]
        if self.right is not None:
            if self.right.dim() == 1:
                down = down / self.right[None, :]
            else:  # down R⁻¹ = (R⁻ᵀ downᵀ)ᵀ
                down = torch.linalg.solve_triangular(self.right.T, down.T, upper=True).T
        return up, down


def weighting(method: str, inputs: InputStats | None, fisher: FisherStats | None,
              fisher_exponent: float | None = None, asvd_alpha: float | None = None) -> Weighting:
    """The weighting of ``method`` for one matrix from its statistics (``None``: the method's
    default exponent and alpha)."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
    spec = METHODS[method]
    exponent = spec.defaults["fisher_exponent"] if fisher_exponent is None else fisher_exponent
    alpha = spec.defaults.get("asvd_alpha") if asvd_alpha is None else asvd_alpha
    return spec.weighting(inputs, fisher, exponent, alpha)


def strategy_weighting(strategy, inputs: InputStats | None, fisher: FisherStats | None) -> Weighting:
    """:func:`weighting` with the method, exponent and alpha of a resolved strategy config."""
    return weighting(strategy.method, inputs, fisher, strategy.fisher_exponent, strategy.asvd_alpha)


@register_method("svd")
def _svd(inputs, fisher, exponent, alpha) -> Weighting:
    return Weighting()


@register_method("fwsvd", needs=("fisher",))
def _fwsvd(inputs, fisher, exponent, alpha) -> Weighting:
    return Weighting(left=_normalized(fisher.row).pow(exponent))


@register_method("asvd", needs=("inputs",), asvd_alpha=0.5)  # ASVD's published α
def _asvd(inputs, fisher, exponent, alpha) -> Weighting:
    scale = (inputs.abs_sum / max(inputs.tokens, 1)).clamp_min(1e-6)
    return Weighting(right=_normalized(scale).pow(alpha))


@register_method("whiten", needs=("inputs",), whitening=True)
def _whiten(inputs, fisher, exponent, alpha) -> Weighting:
    return whitened(inputs)


# vac's defaults and how they were chosen: docs/defaults.md
@register_method("vac", needs=("inputs", "fisher"), whitening=True, attn_share=1.75,
                 allocation="global", sequential=True, fisher_exponent=2 / 3, refine="dense")
def _vac(inputs, fisher, exponent, alpha) -> Weighting:
    return whitened(inputs, output_sensitivity(inputs, fisher).pow(exponent / 2))


def whitened(inputs: InputStats, left: torch.Tensor | None = None) -> Weighting:
    """R = chol(XᵀX/n), with an optional left weighting; with the cross term of paired statistics
    (``--correct``) the matrix decomposed fits the dense outputs from the compressed inputs."""
    n = max(inputs.tokens, 1)
    chol, ridge = cholesky_adaptive(inputs.xtx, n, in_place=inputs.disposable)
    if inputs.disposable:
        inputs.xtx = None  # overwritten by the factorization: released now rather than with the object
    target = None
    if inputs.cross is not None:
        # ‖W X_dense − W′ X̃‖² = const + ‖(W* − W′) L‖² with W* = W M C⁻¹ (M cross term, C = L Lᵀ
        # of the compressed inputs X̃): decompose W* L = W M L⁻ᵀ.
        target = torch.linalg.solve_triangular(chol, (inputs.cross / n).T, upper=False).T
    return Weighting(left=left, right=chol, ridge=ridge, target=target)


def output_sensitivity(inputs: InputStats, fisher: FisherStats) -> torch.Tensor:
    """Mean squared loss gradient per output channel: Fisher row sum / mean input energy."""
    energy = inputs.xtx.diagonal().sum() / max(inputs.tokens, 1)
    return (fisher.row / fisher.windows / energy.clamp_min(1e-30)).clamp_min(1e-30)


def _normalized(v: torch.Tensor) -> torch.Tensor:
    v = v.double().clamp_min(1e-30)
    return v / v.mean()


def decompose(weight: torch.Tensor, w: Weighting):
    """SVD of the weighted matrix: (U, S, Vh), fp64."""
    return torch.linalg.svd(w.apply(weight), full_matrices=False)


def tail_energy(s: torch.Tensor) -> torch.Tensor:
    """``tail[r]`` = Σ_{k≥r} s_k², the weighted error of keeping rank r, for r = 0..len(s)."""
    sq = s.double().square()
    return torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])
