"""The typed configs of a compression: what data it calibrates on, and which strategy it follows.

:class:`DataConfig` (calibration source, windows, length, seed, batch) is kept apart from
:class:`StrategyConfig` (method, ratio, allocation, order, Fisher exponent, split, rank grid): the
dense statistics depend on the data only, so compressions that differ in strategy share them, and a
strategy file (``vac search``) is a serialized :class:`StrategyConfig`. Every default is written once,
here; each field carries its help text (as PEFT's ``LoraConfig`` fields do), from which the CLI builds
its options (:mod:`vac.cli.options`). ``None`` strategy fields take the method's defaults (the method
registry, :mod:`vac.core.methods`); :meth:`StrategyConfig.resolved` returns a new, filled-in object.
:class:`DistillConfig` holds the hyper-parameters of a recovery run (:mod:`vac.recover.distill`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import VacError

DEFAULT_MODEL = "smollm2-135m"
# chosen on the search splits by benchmarks/strategy_probe.py (docs/defaults.md); a mix takes an equal
# share of the windows from each part
DEFAULT_CALIB = "web-bible:calib+shakespeare:calib+handbook:calib"
DEFAULT_SEARCH = "austen:search"
DEFAULT_EVAL = "austen:eval"
# the held-out texts every default is decided on (their search splits: a novel, a modern technical book,
# the GNU maintainers' guide); never an evaluation split
DECISION_TEXTS = ("austen:search", "handbook:search", "gnu:search")
# the held-out texts every quality figure is reported on: a novel, a modern technical book, and a kind of
# text no calibration source has (the GNU standards); evaluation only, never a decision
# refinement of each factorized layer (vac.core.refine): what its factors are fitted to
REFINE_TARGETS = ("none", "own", "dense")
REPORT_EVALS = ("austen:eval", "handbook:eval", "gnu:eval")
# distillation: teacher logits kept per position in a teacher cache; scored tokens per chunk of the loss
DISTILL_TOP_K = 64
DISTILL_LOSS_CHUNK = 128
# distillation data: the share of chat-formatted samples in the mix and the size of the built-in chat set
DISTILL_CHAT_FRACTION = 0.2
DISTILL_CHAT_SAMPLES = 512


def _opt(default, help: str, **extra) -> Any:
    """A dataclass field with its help text (and CLI hints) in the metadata."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class DataConfig:
    """What the calibration statistics are computed from."""

    calib: str = _opt(DEFAULT_CALIB, "calibration text source")
    calib_windows: int = _opt(64, "calibration windows", min=1)
    fisher_windows: int = _opt(16, "windows for the Fisher backward passes", min=1)
    seq_len: int = _opt(512, "window length for calibration and evaluation", min=2)
    seed: int = _opt(0, "calibration sampling seed")
    batch_size: int = _opt(8, "windows per forward pass of the layer-streamed statistics", min=1, cli=False)

    def __post_init__(self):
        _check_minimums(self)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StrategyConfig:
    """How a model is compressed (everything but the data). ``None``: the method's default."""

    ratio: float = _opt(1.8, "parameter reduction of the decoder linears (> 1)")
    method: str = _opt("vac", "factorization method", choices="methods")
    allocation: str | None = _opt(None, "rank allocation: uniform; depth (each matrix type's budget spread over the "
                                  "layers by a knapsack); global (one knapsack) [default: the method's]",
                                  choices="allocations")
    sequential: bool | None = _opt(None, "statistics from compressed earlier layers [default: the method's]",
                                   flag="--sequential/--no-sequential")
    correct: bool = _opt(False, "sequential: fit the dense outputs from compressed inputs (experimental)",
                         flag="--correct/--no-correct")
    refine: str | None = _opt(None, "fit each factorized layer's factors to the dense layer: none; own (the dense layer "
                              "on the same compressed inputs); dense (the dense model's hidden states) "
                              "[default: the method's]", choices="refine targets")
    refine_steps: int = _opt(24, "Adam steps of the refinement per layer (one calibration batch each)", min=1)
    refine_lr: float = _opt(3e-4, "learning rate of the refinement")
    order: str | tuple[int, ...] = _opt("front-to-back", "layer order of the sequential factorization, or a comma "
                                        "list of layer indices", cli_type=str, choices="orders")
    fisher_exponent: float | None = _opt(None, "tempering exponent of the Fisher information [default: the "
                                         "method's]")
    type_weights: dict[str, float] | None = _opt(None, "curve multipliers per matrix type (q, k, ..., down); "
                                                 "strategy files only", cli=False)
    attn_ratio: float | None = _opt(None, "fixed budget ratio of the attention linears [default: the method's split, "
                                    "vac compresses attention harder; pass the --ratio value for no split]")
    mlp_ratio: float | None = _opt(None, "fixed budget ratio of the MLP linears")
    rank_step: int = _opt(8, "rank grid step of the allocation", min=1)
    rank_floor: int = _opt(8, "smallest rank a matrix can get", min=1)
    asvd_alpha: float | None = _opt(None, "activation exponent of asvd [default: the method's]", cli=False)

    def __post_init__(self):
        from .core.allocate import ALLOCATIONS
        from .core.methods import METHODS
        from .core.orders import parse_order

        _check_minimums(self)
        if self.method not in METHODS:
            raise VacError(f"unknown method '{self.method}'; choose from {', '.join(METHODS)}")
        if not self.ratio > 1:
            raise VacError(f"--ratio must be greater than 1, got {self.ratio:g}")
        for name in ("attn_ratio", "mlp_ratio"):
            value = getattr(self, name)
            if value is not None and not value > 1:
                raise VacError(f"--{name.replace('_', '-')} must be greater than 1, got {value:g}")
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise VacError(f"unknown allocation '{self.allocation}'; choose {', '.join(ALLOCATIONS)}")
        object.__setattr__(self, "order", parse_order(self.order))
        if self.type_weights is not None:
            if not isinstance(self.type_weights, dict) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    for k, v in self.type_weights.items()):
                raise VacError("type_weights must map matrix types (q, k, ...) to numbers")
        if self.refine is not None and self.refine not in REFINE_TARGETS:
            raise VacError(f"unknown refine target '{self.refine}'; choose {', '.join(REFINE_TARGETS)}")
        if not self.refine_lr > 0:
            raise VacError(f"--refine-lr must be positive, got {self.refine_lr:g}")
        if self.correct:
            spec = METHODS[self.method]
            if not spec.whitening or self.sequential is False:
                raise VacError("--correct needs --sequential and a whitening method "
                               f"({', '.join(m for m, s in METHODS.items() if s.whitening)})")

    def resolved(self) -> "StrategyConfig":
        """A new config with every ``None`` filled from the method's defaults."""
        from .core.methods import METHODS

        spec = METHODS[self.method]
        changes = {k: v for k, v in spec.defaults.items() if getattr(self, k) is None}
        if self.refine is None and (self.correct or not changes.get("sequential", self.sequential)):
            changes["refine"] = "none"  # the method refines sequential compressions without --correct only
        if self.attn_ratio is None and self.mlp_ratio is None and spec.attn_share is not None:
            changes["attn_ratio"] = attn_ratio_of(self.ratio, spec.attn_share)
        done = replace(self, **changes) if changes else self
        if done.correct and not done.sequential:
            raise VacError("--correct needs --sequential and a whitening method")
        if done.refine != "none" and not done.sequential:
            raise VacError(f"--refine {done.refine} needs --sequential (the layer is fitted on the inputs "
                           "that passed the compressed layers below it)")
        if done.refine != "none" and done.correct:
            raise VacError("--refine and --correct do not combine (both fit the dense outputs); choose one")
        return done

    @property
    def needs_fisher(self) -> bool:
        from .core.methods import METHODS

        return "fisher" in METHODS[self.method].needs

    @property
    def needs_inputs(self) -> bool:
        from .core.methods import METHODS

        return "inputs" in METHODS[self.method].needs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["order"] = self.order if isinstance(self.order, str) else list(self.order)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "strategy") -> "StrategyConfig":
        """Validated field by field; a one-line VacError names the bad field."""
        if not isinstance(d, dict):
            raise VacError(f"{where} is not a JSON object")
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise VacError(f"{where} has unknown fields: {', '.join(unknown)}")
        for key, value in d.items():
            _check_type(names[key], value, where)
        try:
            return cls(**d)
        except TypeError as exc:
            raise VacError(f"{where} is invalid: {exc}") from None


def attn_ratio_of(ratio: float, share: float) -> float:
    """The attention budget ratio for a split share: ``1 + (ratio − 1)·share`` (share > 1: attention
    compressed harder than the whole; share 1: no split)."""
    return round(1 + (ratio - 1) * share, 12)  # a decimal: 2.4, not 2.4000000000000004, in configs and keys


@dataclass(frozen=True)
class CompressConfig:
    """A whole compression: its strategy and its calibration data."""

    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @classmethod
    def of(cls, **flat) -> "CompressConfig":
        """Build from flat field names of both configs: ``CompressConfig.of(ratio=2, calib_windows=8)``."""
        data_names = {f.name for f in fields(DataConfig)}
        unknown = set(flat) - data_names - {f.name for f in fields(StrategyConfig)}
        if unknown:
            raise VacError(f"unknown config fields: {', '.join(sorted(unknown))}")
        return cls(StrategyConfig(**{k: v for k, v in flat.items() if k not in data_names}),
                   DataConfig(**{k: v for k, v in flat.items() if k in data_names}))

    def resolved(self) -> "CompressConfig":
        return replace(self, strategy=self.strategy.resolved())

    def to_dict(self) -> dict:
        return {"strategy": self.strategy.to_dict(), "data": self.data.to_dict()}


@dataclass(frozen=True)
class EvalConfig:
    """The held-out perplexity reported before and after a compression (``data=''``: none)."""

    data: str = _opt(DEFAULT_EVAL, "held-out text source ('' to skip)")
    windows: int = _opt(40, "evaluation windows (the first N non-overlapping ones)", min=1, option="--eval-windows")

    def __post_init__(self):
        _check_minimums(self)


def _check_minimums(cfg) -> None:
    for f in fields(cfg):
        low = f.metadata.get("min")
        value = getattr(cfg, f.name)
        if low is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            option = f.metadata.get("option") or f"--{f.name.replace('_', '-')}"
            raise VacError(f"{option} must be an integer of at least {low}, got {value!r}")


_TYPES = {"float": (int, float), "int": (int,), "str": (str,), "bool": (bool,)}


def _check_type(f, value, where: str) -> None:
    """A strategy-file value against its field's annotation (JSON types)."""
    if value is None and "None" in str(f.type):
        return
    kinds = [t.strip() for t in str(f.type).split("|")]
    ok = False
    for kind in kinds:
        base = kind.split("[")[0]
        if base in _TYPES and isinstance(value, _TYPES[base]) and (base == "bool" or not isinstance(value, bool)):
            ok = True
        elif base == "tuple" and isinstance(value, list) and all(isinstance(v, int) for v in value):
            ok = True
        elif base == "dict" and isinstance(value, dict):
            ok = True
    if not ok:
        raise VacError(f"{where}: field '{f.name}' must be {f.type}, got {json.dumps(value)}")


@dataclass
class DistillConfig:
    """Hyper-parameters of one distillation run (all of them define the run, for resuming)."""

    steps: int = 200  # optimizer steps (upper bound when max_minutes is set)
    seq_len: int = 256
    batch_size: int = 8  # global batch: sequences per optimizer step, over all ranks
    grad_accum: int = 1  # micro-batches per rank per step
    lr: float = 1e-4  # MLP (base) learning rate
    # attention linears train at attn_lr_mult × lr (the published recipe used ~10; 3 was best of 10 and 3 at
    # 40 steps on the search splits: benchmarks/results/recovery_probe.json)
    attn_lr_mult: float = 3.0
    warmup: int = 10  # linear warmup steps, then cosine decay to min_lr_ratio × lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # on linear weights only
    clip: float = 1.0  # max global gradient norm (0: no clipping)
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the KD term; 1 − alpha on the NLL
    train_norms: bool = False
    train_embeddings: bool = False  # embeddings and a dense lm_head
    top_k: int = DISTILL_TOP_K  # only used with a teacher cache
    seed: int = 0
    save_every: int = 50
    max_minutes: float | None = None  # training-time budget (see plan_steps)
    fsdp: bool = False  # FSDP2 fully_shard per decoder layer, the student's and the teacher's
    # bfloat16 compute, master weights float32: with fsdp FSDP2's MixedPrecisionPolicy (bf16 parameters
    # all-gathered, fp32 gradient reduction), otherwise autocast
    bf16: bool = False
    grad_checkpoint: bool = False  # recompute each decoder layer in the backward (activation checkpointing)
    loss_chunk: int = DISTILL_LOSS_CHUNK  # scored tokens per chunk of the loss (head applied per chunk): head_kd_loss
    snapshot_every: int = 0  # write the trainable parameters every N steps (run_distill's snapshots folder; 0: never)

    def check(self) -> None:
        positive = {"steps": self.steps, "seq_len": self.seq_len - 1, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "lr": self.lr, "temperature": self.temperature,
                    "save_every": self.save_every, "top_k": self.top_k}
        for name, value in positive.items():
            if not value > 0:
                raise VacError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise VacError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.warmup < 0 or self.clip < 0 or self.weight_decay < 0 or self.attn_lr_mult <= 0:
            raise VacError("--warmup, --clip and --weight-decay must be >= 0 and --attn-lr-mult > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise VacError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise VacError(f"--max-minutes must be positive, got {self.max_minutes}")
        if self.loss_chunk <= 0:
            raise VacError(f"--loss-chunk must be positive, got {self.loss_chunk}")
        if self.snapshot_every < 0:
            raise VacError(f"--snapshot-every must be >= 0, got {self.snapshot_every}")

    def defining(self) -> dict:
        """The fields a resumed run must share with the run it continues."""
        # the same steps on another layout (ranks × micro-batches, sharding, checkpointing, loss chunks)
        skip = {"save_every", "max_minutes", "fsdp", "loss_chunk", "grad_checkpoint", "grad_accum", "snapshot_every"}
        return {k: v for k, v in asdict(self).items() if k not in skip}
