"""Layer-streamed compression: memory bounded by one decoder layer, not by the model.

The shape of llm-compressor's sequential pipeline. The model is built with empty (meta) parameters
(``accelerate.init_empty_weights``; buffers such as rotary frequencies stay real); embeddings, final
norm and head are loaded; each decoder layer is read from the safetensors shards (memory-mapped
``safe_open``) onto the compute device when a pass reaches it, upcast to fp32 for the math, and
released (back to meta) when the pass moves on. Passes, each over the layers in order:

A. **Fisher** (methods that use it): a forward over the Fisher windows keeps each window's hidden
   state at every layer boundary (on the host); a backward, layers outer and windows inner, recomputes
   each layer from its saved input and accumulates the diagonal Fisher row/column sums. Each layer is
   loaded twice. The layer's input statistics are gathered in the same recompute, so its allocation
   curves are computed as soon as its Fisher sums are complete, and its XᵀX is freed.
B. **Curves** (allocations that need them, when A did not produce them): a forward pass computes one
   layer's input statistics, turns them into that layer's curves, frees them.
C. **Allocation**: the knapsack over the curves (megabytes).
D. **Factorization**, in the strategy's layer order: each layer's statistics come from inputs that
   passed the layers below it as they are then (sequential: the compressed ones as stored; from the
   nearest cached boundary, so front to back passes each layer once and an order that steps back
   down re-runs the layers changed since) or the dense ones; with ``refine`` its factors are then
   fitted to the dense outputs (:mod:`vac.core.refine`; target ``dense`` keeps the dense model's
   stream beside the compressed one); the factorized layer
   is written to its own shard at once and the windows pass it as stored.

Everything a pass produces is kept in a work folder beside the output (``.OUT.partial``): the analysis
(Fisher sums, curves, ranks) and one shard per finished layer. A killed run rerun with the same
settings resumes at the next unfinished layer and ends with the same checkpoint; the folder is renamed
into place only when complete. The numbers equal the in-memory path (:mod:`vac.core.driver`): same
windows, batches, accumulation order and fp64 statistics.

Memory: :mod:`vac.core.memory` computes each stage's peak from the shapes and settings (the real 7B:
about 8.4 GiB with the defaults, 6.6 GiB with ``--offload-dir``; docs/scale.md). Several processes
(``torchrun``): :mod:`vac.core.distributed`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import ordinary_permissions, remove_stale, replace_dir, torch_save, write_json
from ..config import CompressConfig
from ..errors import VacError
from ..faults import kill_point, stage
from ..models.families import arch_for
from . import distributed as dist
from .allocate import ALLOCATIONS, DENSE, Matrix, assign_ranks, total_params
from .calibrate import FisherStats, LayerStream, input_hooks, window_loss
from .heap import bounded_heap, trim_heap
from .driver import Result, boundary_starts, held_boundaries
from .memory import Shapes, stage_bytes
from .methods import decompose, strategy_weighting, tail_energy
from .orders import layer_order
from .refine import refine_layer

WORK_FORMAT = "vac-stream/1"


# ----------------------------------------------------------------------------- reading the shards


class ShardReader:
    """The tensors of a safetensors model folder by name (one or several shards). Each read maps the
    shard, copies the tensor out and unmaps it again, so the source's pages do not accumulate in this
    process's resident memory as the layers go by."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", framework="pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise VacError(f"{self.folder} holds no safetensors weights (streamed compression reads safetensors)")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Several tensors, each shard opened once."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, members in by_file.items():
            with safe_open(self.folder / file, framework="pt") as f:
                for name in members:
                    out[name] = f.get_tensor(name).clone()
        return out

    def copy_rows(self, name: str, start: int, into: torch.Tensor) -> None:
        """Copy rows ``start:start + len(into)`` of a tensor (dim 0) into ``into`` (any dtype, any
        device), straight from the mapped file (safetensors' ``get_slice``): a rank's shard of a tensor
        read at the memory of that shard's pages, without the rest of the tensor or a host copy."""
        from safetensors import safe_open

        with safe_open(self.folder / self.weight_map[name], framework="pt") as f:
            into.copy_(f.get_slice(name)[start:start + into.shape[0]])

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(self.folder / self.weight_map[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def dtype(self) -> torch.dtype:
        """The storage dtype of the floating-point weights (read from the headers, no tensor read)."""
        from safetensors import safe_open

        kinds = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        for name, file in self.weight_map.items():
            with safe_open(self.folder / file, framework="pt") as f:
                kind = f.get_slice(name).get_dtype()
            if kind in kinds:
                return kinds[kind]
        return torch.float32


def _set(model, name: str, value: torch.Tensor, device) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, name, device, value=value)


def skeleton(folder: str | os.PathLike, device):
    """``(model, reader)``: the model of ``folder`` with every parameter on meta (:class:`Layers` loads
    the layers, the embedding and the head when a pass needs them) and its buffers on ``device``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = ShardReader(folder)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.requires_grad_(False)  # the Fisher pass turns on the weights it needs, one layer at a time
    arch = arch_for(model)
    prefix = arch.layers + "."
    present = set(reader.names())
    for name, _ in model.named_parameters():
        if not name.startswith(prefix) and name not in present and not _tied(model, name):
            raise VacError(f"{folder} is missing tensor {name}")
    for name, buf in list(model.named_buffers()):
        if not name.startswith(prefix) and buf.device.type != "meta":
            _set(model, name, buf.to(device), device)
    return model.eval(), reader


def _tied(model, name: str) -> bool:
    return name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


def _load_outer(model, reader: ShardReader, device, names: list[str]) -> None:
    """Load the named parameters outside the decoder layers (fp32); a tied head shares the embedding."""
    arch, present = arch_for(model), set(reader.names())
    for name in names:
        if name in present:
            _set(model, name, reader.get(name).float(), device)
    if any(_tied(model, n) for n in names) and "lm_head.weight" not in present:
        model.get_submodule(arch.head).weight = model.get_submodule(arch.embed).weight


class Layers:
    """Loads decoder layer ``i`` from the shards (fp32 on the device) and releases it again; ``keep``
    holds the passes' hidden states (:mod:`vac.core.offload`)."""

    def __init__(self, model, reader: ShardReader, device, offload_dir=None):
        from .offload import Keeper

        self.model, self.reader, self.device = model, reader, device
        self.keep = Keeper(offload_dir, device)  # where the passes keep hidden states (memory or disk)
        self.arch = arch_for(model)
        self.stream = LayerStream(model, self.arch)

    def __len__(self) -> int:
        return len(self.stream)

    def _outer_names(self, part: str) -> list[str]:
        """``embed``: the embedding's and the final norm's parameters (the norm, a vector, because the
        model's own forward records the layers' arguments); ``head``: every parameter outside the
        decoder layers but the embedding's (with tied weights, the embedding too)."""
        embed, norm, prefix = self.arch.embed + ".", self.arch.norm + ".", self.arch.layers + "."
        names = [n for n, _ in self.model.named_parameters(remove_duplicate=False) if not n.startswith(prefix)]
        if part == "embed":
            return [n for n in names if n.startswith((embed, norm))]
        return [n for n in names if not n.startswith(embed) or _tied(self.model, "lm_head.weight")]

    @contextmanager
    def outer(self, part: str):
        """The embedding (``embed``) or the final norm and head (``head``) loaded inside the block only:
        outside the passes' first and last steps they are not in memory (at 7B: 1.6 GB each in fp32)."""
        from accelerate.utils import set_module_tensor_to_device

        names = self._outer_names(part)
        _load_outer(self.model, self.reader, self.device, names)
        try:
            yield
        finally:
            for name in names + (["lm_head.weight"] if _tied(self.model, "lm_head.weight") else []):
                try:
                    if self.model.get_parameter(name).device.type != "meta":
                        set_module_tensor_to_device(self.model, name, "meta")
                except AttributeError:
                    pass
            if _tied(self.model, "lm_head.weight"):
                self.model.get_submodule(self.arch.head).weight = self.model.get_submodule(self.arch.embed).weight
            trim_heap()

    def embed(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each batch's embeddings, the embedding loaded for this only; the layers' keyword arguments
        (rotary embeddings, masks) are recorded for these shapes while it is."""
        with self.outer("embed"):
            hidden = [self.stream.embed(b) for b in batches]
            for b in batches:
                self.stream.layer_kwargs(b)
        return hidden

    def load(self, i: int, reader: ShardReader | None = None):
        reader = reader or self.reader
        prefix = f"{self.arch.layer_path(i)}."
        layer = self.stream.layers[i]
        names = [prefix + name for name, _ in layer.named_parameters()]
        tensors = reader.get_many(names)
        for name in names:  # popped: each source-dtype copy is freed once its fp32 copy is set
            _set(self.model, name, tensors.pop(name).float(), self.device)
        for name, buf in list(layer.named_buffers()):
            if buf.device.type != "meta":
                _set(self.model, prefix + name, buf.to(self.device), self.device)
        return layer

    def release_all(self) -> None:
        """Every parameter (embeddings, head, norms too) back to meta."""
        from accelerate.utils import set_module_tensor_to_device

        for name, p in list(self.model.named_parameters()):
            if p.device.type != "meta":
                set_module_tensor_to_device(self.model, name, "meta")

    def release(self, i: int) -> None:
        from accelerate.utils import set_module_tensor_to_device

        layer = self.stream.layers[i]
        for name, _ in list(layer.named_parameters()):
            set_module_tensor_to_device(self.model, f"{self.arch.layer_path(i)}.{name}", "meta")
        trim_heap()


# ----------------------------------------------------------------------------- the analysis


@dataclass
class Analysis:
    """What passes A–C leave: Fisher sums, allocation curves, the rank map."""

    fisher: dict[str, FisherStats] = field(default_factory=dict)
    curves: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks: dict[str, int] | None = None

    def pack(self) -> dict:
        from ..cache import pack_fisher

        return {"fisher": pack_fisher(self.fisher), "curves": self.curves, "ranks": self.ranks}

    @classmethod
    def unpack(cls, d: dict) -> "Analysis":
        from ..cache import unpack_fisher

        return cls(unpack_fisher(d["fisher"]), d["curves"], d["ranks"])


@torch.no_grad()
def _layer_curves(layers: Layers, i: int, analysis: Analysis, inputs: dict, strategy) -> None:
    """The allocation curves of layer ``i`` (loaded) from its statistics (as driver.allocation_curves);
    several ranks: each computes its share of the matrices, then all are broadcast."""
    arch, me = layers.arch, dist.world()[0]
    paths = [f"{arch.layer_path(i)}.{name}" for name in arch.linears]
    mine = {}
    for j, path in enumerate(paths):
        stats = _pop(inputs, path)
        if dist.owner(j) != me:
            continue
        w = strategy_weighting(strategy, stats, analysis.fisher.get(path))
        sv = torch.linalg.svdvals(w.apply(layers.model.get_submodule(path).weight))
        del w, stats
        mine[path] = tail_energy(sv) * (strategy.type_weights or {}).get(arch.kind(path), 1.0)
    for j, path in enumerate(paths):
        got = dist.broadcast({"curve": mine[path]} if path in mine else None, dist.owner(j), layers.device)
        analysis.curves[path] = got["curve"].cpu()


def fisher_pass(layers: Layers, windows: torch.Tensor, analysis: Analysis, strategy, curves: bool, progress: bool):
    """Pass A: diagonal Fisher of every decoder linear, layers outer and windows inner (see
    ``calibrate.fisher_stats`` for the per-window computation it reproduces); with ``curves``, each
    layer's curves from the input statistics of the same recompute."""
    stream, arch, n = layers.stream, layers.arch, len(layers)
    ws = list(dist.share(windows).split(1))
    dev, keep = layers.device, layers.keep
    with torch.no_grad():  # every boundary on the host (or on disk)
        hidden = [keep(h.cpu() for h in layers.embed(ws))]
        for i in tqdm(range(n), desc="fisher forward", unit="layer", disable=not progress):
            layers.load(i)
            hidden.append(keep(stream.layer(i, h.to(dev), w).cpu() for h, w in zip(hidden[-1], ws)))
            layers.release(i)
    grads = []
    with layers.outer("head"):
        for h, w in zip(hidden[-1], ws):
            top = h.to(dev).requires_grad_(True)
            window_loss(stream.head(top), w).backward()
            grads.append(top.grad)
    hidden.pop()
    for i in tqdm(reversed(range(n)), total=n, desc="fisher backward", unit="layer", disable=not progress):
        layer = layers.load(i)
        for p in layer.parameters():
            p.requires_grad_(False)
        linears = {f"{arch.layer_path(i)}.{name}": layer.get_submodule(name) for name in arch.linears}
        for path, m in linears.items():
            m.weight.requires_grad_(True)
            analysis.fisher[path] = FisherStats(
                torch.zeros(m.out_features, dtype=torch.float64, device=layers.device),
                torch.zeros(m.in_features, dtype=torch.float64, device=layers.device))
        inputs: dict = {}
        handles = input_hooks(layers.stream, i, inputs) if curves and strategy.needs_inputs else []
        handles += [m.weight.register_post_accumulate_grad_hook(_fisher_sums(analysis.fisher[path]))
                    for path, m in linears.items()]
        try:
            for j, w in enumerate(ws):
                x = hidden[i][j].to(dev).requires_grad_(True)
                stream.layer(i, x, w).backward(grads[j])
                grads[j] = x.grad
                for path in linears:
                    analysis.fisher[path].windows += 1
        finally:
            for handle in handles:
                handle.remove()
        hidden.pop()
        dist.reduce_fisher({path: analysis.fisher[path] for path in linears})
        dist.reduce_inputs(inputs)
        if curves:
            _layer_curves(layers, i, analysis, inputs, strategy)
        layers.release(i)


def _pop(inputs: dict, path: str):
    """The statistics of ``path``, removed from ``inputs``: a group's XᵀX is freed once its last member
    is done, and that member may overwrite it (:attr:`InputStats.disposable`)."""
    stats = inputs.pop(path, None)
    if stats is not None and all(other is not stats for other in inputs.values()):
        stats.disposable = True
    return stats


def _fisher_sums(f: FisherStats):
    """Hook: add a weight's squared gradient to its Fisher row/column sums as soon as autograd has it,
    then drop the gradient (one matrix's gradient in memory at a time, not the layer's)."""

    def hook(param):
        g2 = param.grad.double().square()
        f.row += g2.sum(1)
        f.col += g2.sum(0)
        param.grad = None

    return hook


@torch.no_grad()
def curve_pass(layers: Layers, windows: torch.Tensor, analysis: Analysis, strategy, batch_size: int, progress: bool):
    """Pass B: each layer's input statistics over ``windows`` (dense inputs), its curves, then freed."""
    stream, keep = layers.stream, layers.keep
    batches = list(dist.share(windows).split(batch_size))
    hidden = keep(layers.embed(batches))
    for i in tqdm(range(len(layers)), desc="allocation curves", unit="layer", disable=not progress):
        layers.load(i)
        inputs: dict = {}
        handles = input_hooks(layers.stream, i, inputs) if strategy.needs_inputs else []
        try:
            hidden = keep(stream.layer(i, h, b) for h, b in zip(hidden, batches))
        finally:
            for handle in handles:
                handle.remove()
        dist.reduce_inputs(inputs)
        _layer_curves(layers, i, analysis, inputs, strategy)
        layers.release(i)


# ----------------------------------------------------------------------------- the whole job


def streamable(cfg: CompressConfig) -> str | None:
    """Why ``cfg`` needs the in-memory path (None: it streams)."""
    return "--correct" if cfg.strategy.resolved().correct else None


def _key(source: Path, cfg: CompressConfig, dtype: torch.dtype, windows: torch.Tensor, statistics=None) -> str:
    from ..cache import cache_key

    tensors = [windows] if statistics is None else [windows, statistics]
    return cache_key(str(source), WORK_FORMAT, cfg.to_dict(), str(dtype),
                     *(hashlib.sha256(w.cpu().numpy().tobytes()).hexdigest() for w in tensors)) or ""


def stream_compress(source: str | os.PathLike, tokenizer, cfg: CompressConfig, windows: torch.Tensor,
                    out: str | os.PathLike, *, dtype: torch.dtype | None = None, device="cpu",
                    overwrite: bool = False, finish=None, stats_cache: bool = True, progress: bool = True,
                    log=None, offload_dir: str | os.PathLike | None = None,
                    statistics: torch.Tensor | None = None) -> Result:
    """Compress the model folder ``source`` into the checkpoint folder ``out``, one layer at a time.

    ``dtype``: storage dtype of the checkpoint (default: the source's). ``stats_cache``: reuse the
    Fisher sums and curves of an earlier run on the same model and windows (``$VAC_HOME/stats``,
    whatever the ratio or allocation). ``finish(folder, result)``
    may return more files (name → JSON dict, bytes or text, e.g. ``report.json``) once the checkpoint
    is complete in its work folder (it can be loaded and measured there) and before it is renamed.
    ``offload_dir``: keep the calibration hidden states there instead of in memory (:mod:`vac.core.offload`).
    ``statistics``: the windows the dense statistics (Fisher pass, allocation curves) come from, the first
    ``fisher_windows`` of them (default: of ``windows``), as ``driver.compress`` given ``stats`` (the
    search's short compressions take the full run's statistics, sequential pass and refinement on few
    windows)."""
    cfg = cfg.resolved()
    if why := streamable(cfg):
        raise VacError(f"streamed compression does not support {why}")
    source, out = Path(source), Path(out)
    started = time.perf_counter()
    bounded_heap()
    model, reader = skeleton(source, device)
    if model.config.model_type.startswith("vac_"):
        raise VacError(f"{source} is already a vac checkpoint; compress its dense source model")
    dtype = dtype or reader.dtype()
    layers = Layers(model, reader, device, offload_dir)
    try:
        return _stream(layers, source, tokenizer, cfg, windows, out, dtype, overwrite, finish, stats_cache,
                       progress, log, started, statistics)
    finally:
        layers.keep.close()


def _stream(layers, source, tokenizer, cfg, windows, out, dtype, overwrite, finish, stats_cache, progress, log,
            started, statistics=None) -> Result:
    s, d, model, reader, device = cfg.strategy, cfg.data, layers.model, layers.reader, layers.device
    clock = {}
    arch, n = layers.arch, len(layers)
    matrices = [Matrix(p, *_shape(reader, p)) for p in arch.decoder_linears(n)]
    order = layer_order(s.order, n) if s.sequential else list(range(n))  # the factorization's (moot if not sequential)
    plan = partial(stage_bytes, Shapes.of(model.config, arch, lambda name: reader.shape(f"{name}.weight")),
                   held=held_boundaries(order),
                   windows=len(windows), seq_len=windows.shape[1], fisher_windows=d.fisher_windows,
                   batch_size=d.batch_size, offload=layers.keep.folder is not None, refine=s.refine)
    needs = plan()  # the factorization's figure is made again once the rank map is known
    sources = windows if statistics is None else statistics  # of the dense statistics
    if statistics is not None:
        needs |= {k: v for k, v in plan(windows=len(sources), seq_len=sources.shape[1]).items()
                  if k in ("the Fisher pass", "the allocation curves")}
    main = dist.is_main()  # several ranks (vac.core.distributed): rank 0 alone writes files
    work = out.with_name(f".{out.name}.partial")
    key = _key(source, cfg, dtype, windows, statistics)
    manifest = {"format": WORK_FORMAT, "key": key}
    if main:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)  # what killed in-memory runs left (this path's own work folder is resumed)
        if not _same(work / "manifest.json", manifest):
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            write_json(work / "manifest.json", manifest)
        elif log:
            log(f"resuming the compression in {work}")
    dist.barrier()
    windows = windows.to(device)
    analysis = _load_analysis(work / "analysis.pt")
    if analysis is None:
        curves_needed = ALLOCATIONS[s.allocation].needs_curves
        cached = _analysis_cache(source, cfg, sources, curves_needed) if stats_cache else None
        analysis = _load_analysis(cached) if cached else None
        if analysis is not None and log:
            log(f"dense statistics from {cached} (Fisher sums and allocation curves)")
        analysis = analysis or Analysis()
        dist.barrier()  # every rank has read the caches before rank 0 writes them
        sources = sources.to(device)
        fisher_windows = sources[: d.fisher_windows]
        t0 = time.perf_counter()
        stage("the Fisher pass", needs["the Fisher pass"])
        if s.needs_fisher and not analysis.fisher:
            # sequential: the curves come from the Fisher windows' dense inputs, as in the driver
            fisher_pass(layers, fisher_windows, analysis, s, curves_needed and s.sequential, progress)
        clock["statistics"] = time.perf_counter() - t0
        kill_point("statistics")
        t0 = time.perf_counter()
        stage("the allocation curves", needs["the allocation curves"])
        if curves_needed and not analysis.curves:
            curve_pass(layers, fisher_windows if s.sequential else sources, analysis, s, d.batch_size, progress)
        if cached and main:
            torch_save(Analysis(analysis.fisher, analysis.curves).pack(), cached)
        for m in matrices:
            m.curve = analysis.curves.get(m.path)
        analysis.ranks = assign_ranks(matrices, arch, s)
        clock["allocation"] = time.perf_counter() - t0
        if main:
            torch_save(analysis.pack(), work / "analysis.pt")
    ranks = analysis.ranks
    t0 = time.perf_counter()
    largest = max(sum(m.params(ranks[m.path]) for m in matrices if m.path.startswith(f"{arch.layer_path(i)}."))
                  for i in range(n))
    stage("the factorization", plan(largest_layer=largest)["the factorization"])
    recompute = _factorize_pass(layers, windows, analysis, s, order, d.batch_size, dtype, work, progress)
    clock["factorization"] = time.perf_counter() - t0
    layers.release_all()  # before the assembly and the caller's measurements load their own copies
    kept = {p: r for p, r in ranks.items() if r != DENSE}
    result = Result(kept, sum(m.dense_params for m in matrices), total_params(matrices, ranks), clock, recompute)
    if not main:
        return result
    stage("the save", needs["the save"])
    _assemble(model, reader, tokenizer, kept, dtype, work)
    result.seconds["total"] = time.perf_counter() - started
    _write_extra(work, finish(work, result) if finish else {})
    ordinary_permissions(work)
    kill_point("save")
    for name in ("manifest.json", "analysis.pt"):  # work files, not part of the checkpoint
        (work / name).unlink(missing_ok=True)
    replace_dir(work, out, overwrite)
    return result


def _write_extra(work: Path, files: dict) -> None:
    from ..atomic import atomic_write

    for name, content in files.items():
        atomic_write(work / name, json.dumps(content, indent=2) if isinstance(content, dict) else content)


def _shape(reader: ShardReader, path: str) -> tuple[int, int]:
    out, inp = reader.shape(f"{path}.weight")
    return int(out), int(inp)


def _same(path: Path, manifest: dict) -> bool:
    try:
        return json.loads(path.read_text()) == manifest
    except (OSError, ValueError):
        return False


def _load_analysis(path: Path) -> Analysis | None:
    from ..cache import load_entry

    packed = load_entry(path, lambda p: torch.load(p, weights_only=True))
    return Analysis.unpack(packed) if isinstance(packed, dict) else None


def _analysis_cache(source: Path, cfg: CompressConfig, windows: torch.Tensor, curves: bool) -> Path | None:
    """Where the Fisher sums and curves of this model, these windows and this weighting are cached
    (they do not depend on the ratio, the split or the allocation's budget)."""
    from ..cache import cache_dir, cache_key

    s = cfg.strategy
    what = [s.method, s.fisher_exponent, s.asvd_alpha, s.type_weights, s.sequential, curves,
            cfg.data.fisher_windows, cfg.data.batch_size]
    key = cache_key(str(source), WORK_FORMAT, what, hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest())
    return cache_dir() / "stats" / f"analysis-{key}.pt" if key else None


def _layer_file(work: Path, i: int) -> Path:
    return work / f"model-layer-{i:05d}.safetensors"


@torch.no_grad()
def _factorize_pass(layers: Layers, windows, analysis: Analysis, s, order: list[int], batch_size: int, dtype,
                    work: Path, progress):
    """Pass D, in the strategy's layer order; each finished layer is written to its shard. Sequential:
    a layer's statistics come from windows that passed the layers below it in their current state
    (factorized ones as stored, so a resumed run feeds the later layers the same inputs), from the
    nearest cached boundary below it as in :func:`vac.core.driver._sequential`: front to back passes
    each layer once, other orders re-run the layers changed since (``driver.sequential_passes``).
    Otherwise the windows pass the dense layers and the order is moot (front to back)."""
    from ..checkpoint.hf.modeling_vac import replace_with_low_rank

    stream, n, keep = layers.stream, len(layers), layers.keep
    batches = list(dist.share(windows).split(batch_size))
    # boundary -> hidden states entering that layer: the compressed stream and (refine target
    # ``dense``) the dense model's stream, for its targets
    compressed = {0: keep(layers.embed(batches))}
    dense = {0: compressed[0]} if s.refine == "dense" else None
    done = {i for i in range(n) if _layer_file(work, i).is_file()}  # before any rank writes
    finished: set[int] = set()  # factorized layers (low-rank modules; their weights in their shards)
    remaining = list(order)

    tally = [0, 0.0]  # the compressed stream's layer passes re-run to reach later layers, and their seconds

    def advance(cache: dict, i: int, count: bool = False) -> list:
        """The hidden states entering layer ``i`` from the nearest cached boundary below (cached), through
        the layers between as they are now (finished ones as stored). The dense stream never walks a
        finished layer: finishing layer j (or skipping it, written before a kill) caches its dense
        boundary j + 1, which every later layer above j starts from or above, so it needs no dense copy
        of a factorized layer."""
        t0, start = time.perf_counter(), max(b for b in cache if b <= i)
        hidden = cache[start]
        for j in range(start, i):
            if j in finished:
                assert cache is compressed, "the dense stream passes no factorized layer"
                _load_stored(layers, j, _layer_file(work, j))
            else:
                layers.load(j)
            hidden = keep(stream.layer(j, h, b) for h, b in zip(hidden, batches))
            layers.release(j)
        cache[i] = hidden
        if count:
            tally[0] += i - start
            tally[1] += time.perf_counter() - t0
        return hidden

    def kept(cache: dict) -> dict:  # the boundaries a remaining layer starts from
        return {b: h for b, h in cache.items() if b in boundary_starts(cache, remaining).values()}

    bar = tqdm(order, desc=f"factorize ({s.method}, streamed)", unit="layer", disable=not progress)
    for i in bar:
        remaining.remove(i)
        # the streams in turn (one dense layer loaded at a time): the compressed inputs of layer i, the
        # dense ones and the dense layer's outputs (also for a layer written before a kill, which keeps
        # the dense stream off factorized layers)
        hidden = advance(compressed, i, count=True) if i not in done else None
        dense_hidden = advance(dense, i) if dense is not None else None
        if dense is not None or i not in done:
            layers.load(i)  # dense, from the source
        target = None
        if dense is not None:
            target = dense[i + 1] = keep(stream.layer(i, h, b) for h, b in zip(dense_hidden, batches))
            del dense_hidden
            dense = kept(dense)
        new = None  # the compressed stream's boundary i + 1, when it is made now
        if i in done:  # written before a kill: the windows pass it as stored when a later layer needs it
            layers.release(i)
            replace_with_low_rank(layers.model, _layer_ranks(analysis, layers.arch, i))
        else:
            new = _factorize_layer(layers, i, hidden, target, analysis, s, batches, dtype, work)
        del hidden, target
        finished.add(i)
        layers.release(i)
        valid = {b: h for b, h in compressed.items() if b <= i}  # boundaries above i passed its old state
        if new is not None:
            valid[i + 1] = new
        del new
        compressed = kept(valid)
        kill_point("sequential")
    return tuple(tally)


def _layer_ranks(analysis: Analysis, arch, i: int) -> dict[str, int]:
    prefix = arch.layer_path(i) + "."
    return {p: r for p, r in analysis.ranks.items() if p.startswith(prefix) and r != DENSE}


def _factorize_layer(layers: Layers, i: int, hidden, target, analysis: Analysis, s, batches, dtype, work: Path):
    """Factorize (and refine, towards ``target`` or, for ``own``, the dense layer's outputs on
    ``hidden``) layer ``i`` from its inputs ``hidden``; write its shard; returns the hidden states
    leaving it (sequential: as stored, otherwise the dense layer's)."""
    from safetensors.torch import save_file

    from ..atomic import atomic_write
    from ..models.layers import make_low_rank

    stream, model, me, keep = layers.stream, layers.model, dist.world()[0], layers.keep
    prefix = layers.arch.layer_path(i) + "."
    todo = _layer_ranks(analysis, layers.arch, i)
    layer = stream.layers[i]  # loaded dense by the caller
    inputs: dict = {}
    handles = input_hooks(layers.stream, i, inputs) if s.needs_inputs else []
    own = None  # the dense layer's outputs on the compressed inputs (refine target "own")
    try:
        outputs = None if s.sequential else keep(stream.layer(i, h, b) for h, b in zip(hidden, batches))
        if s.refine == "own":
            own = keep(stream.layer(i, h, b) for h, b in zip(hidden, batches))
        for h, b in zip(hidden, batches) if s.sequential and handles and own is None else ():
            stream.layer(i, h, b)  # for the statistics only: the windows pass the factorized layer below
    finally:
        for handle in handles:
            handle.remove()
    dist.reduce_inputs(inputs)
    for j, (path, rank) in enumerate(todo.items()):  # this rank's share of the matrices
        stats = _pop(inputs, path)
        if dist.owner(j) == me:
            w = strategy_weighting(s, stats, analysis.fisher.get(path))
            up, down = w.factors(*decompose(model.get_submodule(path).weight, w), rank)
            del w
            model.set_submodule(path, make_low_rank(model.get_submodule(path), up, down))
            del up, down
        del stats
    inputs.clear()
    for j, path in enumerate(todo if dist.world()[1] > 1 else ()):  # the other ranks' factors
        m = model.get_submodule(path)
        got = dist.broadcast({"up": m.up.weight, "down": m.down.weight} if dist.owner(j) == me else None,
                             dist.owner(j), layers.device)
        if dist.owner(j) != me:
            model.set_submodule(path, make_low_rank(m, got["up"], got["down"]))
    refined = None
    if s.refine != "none":  # every rank fits the same factors on its share of the windows
        refined = refine_layer(stream, i, hidden, own if s.refine == "own" else target, batches,
                               s.refine_steps, s.refine_lr, keep=keep if dtype == torch.float32 else None)
    del own
    tensors = {prefix + k: v.detach().to(dtype).contiguous().cpu() for k, v in layer.state_dict().items()}
    if me == 0:
        atomic_write(_layer_file(work, i), lambda tmp, t=tensors: save_file(t, str(tmp), metadata={"format": "pt"}))
    if s.sequential and dtype != torch.float32:  # the windows pass the layer as stored
        for name, t in tensors.items():
            _set(layers.model, name, t.float(), layers.device)
    del tensors
    if refined is not None and refined.outputs is not None:  # the refined layer's, as stored (fp32)
        return refined.outputs
    return keep(stream.layer(i, h, b) for h, b in zip(hidden, batches)) if s.sequential else outputs


def _load_stored(layers: Layers, i: int, shard: Path) -> None:
    """Put the tensors of a written layer shard (upcast to fp32) into layer ``i``."""
    from safetensors.torch import load_file

    for name, t in load_file(shard).items():
        _set(layers.model, name, t.float(), layers.device)


def _assemble(model, reader: ShardReader, tokenizer, ranks: dict, dtype, work: Path) -> None:
    """The rest of the checkpoint in the work folder: non-layer tensors, index, config, code, tokenizer."""
    from safetensors.torch import save_file

    from .. import checkpoint
    from ..atomic import atomic_write
    from ..models.families import family_for

    arch = arch_for(model)
    prefix = arch.layers + "."
    rest = {k: t.to(dtype).contiguous() for k, t in reader.get_many([k for k in reader.names()
                                                                   if not k.startswith(prefix)]).items()}
    atomic_write(work / "model-rest.safetensors", lambda tmp: save_file(rest, str(tmp), metadata={"format": "pt"}))
    checkpoint.write_index(work)
    config_class, _ = checkpoint.vac_classes(model)
    base = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "auto_map", "vac_ranks")}
    config = config_class(**base, vac_ranks=ranks)
    config.auto_map = checkpoint.auto_map(family_for(model))
    config.dtype = dtype
    config.save_pretrained(work)
    checkpoint.write_shipped(work, model)
    if (reader.folder / "generation_config.json").is_file():
        shutil.copy2(reader.folder / "generation_config.json", work / "generation_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(work)


def window_nll(stream: LayerStream, hidden: list[torch.Tensor], windows: list[torch.Tensor]) -> tuple[float, int]:
    """``(summed NLL, tokens)`` of each window's next tokens from its last hidden state (head loaded)."""
    import torch.nn.functional as F

    total, count = 0.0, 0
    for h, w in zip(hidden, windows):
        logits = stream.head(h)[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    return total, count


@torch.no_grad()
def stream_perplexity(folder: str | os.PathLike, windows: torch.Tensor, device="cpu", progress: bool = True) -> dict:
    """:func:`vac.core.evaluate.perplexity` of the model in ``folder`` (dense or vac), one layer in
    memory at a time; windows are scored one by one, as there."""
    import math


    bounded_heap()
    model, reader = skeleton(folder, device)
    layers = Layers(model, reader, device)
    ws = [w.to(device) for w in windows.split(1)]
    hidden = layers.embed(ws)
    for i in tqdm(range(len(layers)), desc="perplexity (streamed)", unit="layer", disable=not progress, leave=False):
        layers.load(i)
        hidden = [layers.stream.layer(i, h, w) for h, w in zip(hidden, ws)]
        layers.release(i)
    with layers.outer("head"):
        total, count = window_nll(layers.stream, hidden, ws)
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "seq_len": windows.shape[1], "windows": windows.shape[0]}
