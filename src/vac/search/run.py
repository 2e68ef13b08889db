"""Evolutionary strategy search at a fixed parameter budget (``vac search``).

A *genome* is one compression strategy: a layer order (a permutation of the decoder layers, started
from middle-out, front-to-back or back-to-front and moved within the outward family of
:func:`vac.core.orders.outward`: its start layer and the side it turns to first), the
Fisher exponent (vac), the attention/MLP budget split (``attn_ratio = 1 + (ratio − 1)·share``), the
allocation within each component (uniform ranks, or the knapsack with per-matrix-type curve weights
``StrategyConfig.type_weights``, powers of two) and the method (vac, or whiten = vac without Fisher
weighting). Every genome decodes to a :class:`~vac.config.CompressConfig` at the requested ratio:
:func:`assert_budget` checks each candidate's rank map (never more parameters than the budget; from the
knapsack, less than one rank step per component below it; uniform ranks round each matrix down), so
no candidate can win by compressing less.

Fitness is perplexity on a *search* split (``austen:search`` by default) whose documents are disjoint
from the calibration and the evaluation documents (:func:`check_sources`, by ``corpora.SPLIT_DOCS``
for the built-in corpora, by file content otherwise). The winner is scored once on the evaluation
split (and so is the default, as the reference).

Speed. Everything that does not depend on the genome is computed once: the dense statistics (cached
in ``$VAC_HOME/stats``) and, per (method, Fisher exponent), the weighted SVD of every matrix, stored as
factor pairs at the largest useful rank (``factors-*.safetensors``). The full method compresses
sequentially and refines each layer, minutes per candidate on a CPU, so by default (``proxy=True``)
candidates get a proxy fitness, ``SearchSetup.proxy_score``:

- ``"short"`` (the default): the genome's own *short* sequential compression, every gene and the
  refinement included (``order_refine_steps`` steps a layer), from ``order_windows`` calibration
  windows of ``order_seq_len`` tokens, with the full run's dense statistics (Fisher, allocation
  curves); its perplexity on the search windows. The first population is the default and its
  mutants. ``benchmarks/short_proxy.py`` measures how it ranks genomes against the full compression.
- ``"truncation"``: a knapsack over the cached spectra and a truncation of the cached factors (no
  sequential pass, no refinement, seconds a genome), times the genome's order's short score (the
  default genes in that order) relative to the default order's. Under the refinement it misranks
  genomes (the Fisher exponent most).

The top-k genomes by fitness plus the default are re-scored with the full configuration (sequential,
as ``vac compress``) on the search split, and the best of those is the winner. ``proxy=False`` scores
every candidate with the full configuration (GPU-sized budgets).

Resume. The state (population, fitness archive, RNG state, generation index, the final-stage scores)
is written atomically to ``OUT/state.json`` after every evaluation and every generation; rerunning the
same command continues where it stopped and gives the same result as an uninterrupted run (a run that
stops for ``--budget-minutes`` depends on the clock; the number of generations done is recorded).
Results are deterministic for a seed on a given machine and worker count.

Outputs in ``OUT``: ``strategy.json`` (``vac compress --strategy``; read by :func:`load_strategy`),
``search.json`` (summary, top genomes, history), ``fitness.png`` (best/median per generation).
:func:`vac.search.ablation.run_ablation` compresses the default with one setting changed at a time (order, exponent,
allocation) and writes ``ablation.json`` and ``ablation.md``.
"""

from __future__ import annotations

import json
import random
import statistics as stats_mod
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Callable

from ..atomic import atomic_write, check_output, write_json
from ..config import DataConfig, StrategyConfig
from ..core.driver import check_budget, sequential_passes
from ..core.orders import describe_order
from ..data.windows import eval_windows, sample_windows
from ..errors import VacError
from ..faults import kill_point
from ..models.families import arch_for
from .scoring import InMemoryEngine
from .space import Genome, SearchSetup, Space, check_sources, feasible_shares
from .streamed import StreamedEngine

FORMAT = "vac-strategy/1"


# ----------------------------------------------------------------------------- the search


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rng_state(rng: random.Random):
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from(state) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


def rescore_seconds(order, timing: dict) -> float:
    """Estimated seconds of a full re-score with layer ``order``, from the default's measured costs in
    ``timing``: its compression and search PPL, plus the decoder-layer passes ``order`` re-runs beyond
    the default's (middle-out about L²/3, front-to-back L − 1) at the default's seconds per pass."""
    if "full_compress_s" not in timing:
        return 0.0
    extra = max(sequential_passes(list(order)) - timing.get("full_passes", 0), 0)
    return timing["full_compress_s"] + timing["search_ppl_s"] + extra * timing.get("pass_s", 0.0)


class _Run:
    """One search session over an output folder (state loaded from / saved to ``state.json``)."""

    def __init__(self, setup: SearchSetup, out: Path, workers: int, progress: bool, log):
        self.setup, self.out, self.workers, self.progress, self.log = setup, Path(out), workers, progress, log
        self.started = time.monotonic()
        self.state = self._read_state()
        self.base_elapsed = self.state["elapsed_s"] if self.state else 0.0
        self.cache = self.out / "cache"  # factor sets of this search (the statistics are in $VAC_HOME/stats)
        engine = StreamedEngine if setup.streamed else InMemoryEngine
        self.engine = engine(setup, self.cache, workers, progress, log)
        self.model, tok = self.engine.model, self.engine.tokenizer  # streamed: a skeleton (shapes, embeddings)
        self.n_layers = len(self.model.get_submodule(arch_for(self.model).layers))
        self.default = Genome.default(self.n_layers)
        check_budget(self.model, self.default.config(setup, full=True))
        self.calib = sample_windows(tok, setup.calib, setup.seq_len, setup.calib_windows, seed=0)
        self.search_windows = eval_windows(tok, setup.search_data, setup.seq_len, setup.search_windows)
        self.eval_windows = (eval_windows(tok, setup.eval_data, setup.seq_len, setup.eval_windows)
                             if setup.eval_data else None)
        self.order_calib = setup.order_calibration(tok) if setup.order_windows else None
        self.engine.prepare(self.calib, self.search_windows)
        self.space = Space(self.n_layers, setup.methods, feasible_shares(self.model, setup))
        self.models: dict[str, object] = {}  # handles of full re-scores kept for the eval scoring

    # state ---------------------------------------------------------------------------------------
    def _read_state(self) -> dict | None:
        path = self.out / "state.json"
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except ValueError:
            raise VacError(f"{path} is not valid JSON; delete it to start the search again") from None
        if state.get("setup") != self.setup.to_json():
            theirs = state.get("setup") or {}
            diff = [k for k in self.setup.to_json() if theirs.get(k) != self.setup.to_json()[k]]
            raise VacError(f"{self.out} holds a search with other settings ({', '.join(diff) or 'format'}); "
                           "use another --out or the same options to resume it")
        return state

    def elapsed(self) -> float:
        return self.base_elapsed + time.monotonic() - self.started

    def save(self) -> None:
        self.state["elapsed_s"] = self.elapsed()
        write_json(self.out / "state.json", self.state)

    def key(self, g: Genome) -> str:
        return self.setup.memo_key(g)

    # scoring -------------------------------------------------------------------------------------
    def full_entry(self, g: Genome, keep: bool = False) -> dict:
        """Full-config score of ``g`` on the search split (memoized in the state)."""
        key = g.full_key()
        if key in self.state["full"]:
            return self.state["full"][key]
        t0 = time.perf_counter()
        entry, timing, handle = self.engine.full(g)
        entry = {"genome": g.to_dict()} | entry | {"seconds": time.perf_counter() - t0}
        self.state["full"][key] = entry
        if "full_compress_s" not in self.state["timing"]:  # the default's costs, the unit of the final-stage estimate
            self.state["timing"].update(timing)
        if keep:
            self.models[key] = handle
        else:
            self.engine.release([handle])
        self.save()
        return entry

    def evaluate(self, pop: list[Genome], generation: int) -> int:
        """Fitness of every genome of ``pop`` not scored before (memo by key); returns how many."""
        archive, todo = self.state["archive"], {}
        for g in pop:
            if self.key(g) not in archive:
                todo.setdefault(self.key(g), g)
        genomes = sorted(todo.values(), key=lambda g: (g.method, g.exponent))  # cache locality only
        if not self.setup.proxy:
            for g in genomes:
                entry = self.full_entry(g)
                archive[self.key(g)] = dict(entry, generation=generation)
                self.save()
            return len(genomes)
        if self.setup.proxy_score == "short":
            for g in genomes:
                archive[self.key(g)] = dict(self.short_entry(g), genome=g.to_dict(), generation=generation)
                self.save()
            return len(genomes)
        truncated = self.state.setdefault("proxy", {})  # truncation scores by proxy key (blind to the order)
        need = list({g.proxy_key(): g for g in genomes if g.proxy_key() not in truncated}.values())
        results = iter(self.engine.proxy(need))  # in the order of the genomes that need one
        for g in genomes:
            if g.proxy_key() not in truncated:
                truncated[g.proxy_key()] = next(results)
            entry = dict(truncated[g.proxy_key()], genome=g.to_dict(), generation=generation)
            if self.setup.order_windows:  # the default genes in g's order, relative to the default order
                order, base = (self.short_entry(replace(self.default, order=o))["score"]
                               for o in (g.order, self.default.order))
                entry |= {"truncation": entry["score"], "order_score": order, "score": entry["score"] * order / base}
            archive[self.key(g)] = entry
            self.save()
        return len(genomes)

    def short_entry(self, g: Genome) -> dict:
        """The short score of ``g`` (memoized in the state): ``g`` compressed sequentially from the
        order windows, every gene and the refinement included, scored on the search windows."""
        short = self.state.setdefault("short", {})
        if g.full_key() not in short:
            short[g.full_key()] = self.engine.short_score(g, self.order_calib) | {"genome": g.to_dict()}
            self.save()
            self.log(f"short score {g.describe()}: {short[g.full_key()]['score']:.3f} "
                     f"({short[g.full_key()]['seconds']:.0f} s)")
        return short[g.full_key()]

    def full_s(self, g: Genome) -> float:
        """Estimated seconds of a full re-score of ``g`` (0 once done)."""
        if g.full_key() in self.state["full"]:
            return 0.0
        return rescore_seconds(g.order, self.state["timing"])

    def reserve_s(self) -> float:
        """Estimated seconds of the final stage if it began after the next generation: the full
        re-scores of the top-k (the most expensive k of today's top-k and the next population, any of
        which may end up there) and the two eval scorings."""
        t = self.state["timing"]
        eval_s = t.get("search_ppl_s", 0.0) * (self.setup.eval_windows / self.setup.search_windows
                                               if self.setup.eval_data else 0)
        if not self.setup.proxy:  # every candidate is scored fully as it is evaluated
            return 2 * eval_s
        pool = [e["genome"] for e in self.ranked()[: self.setup.top_k]] + self.state["population"]
        costs = sorted({g.full_key(): self.full_s(g) for g in map(Genome.from_dict, pool)}.values())
        return sum(costs[-self.setup.top_k:]) + 2 * eval_s

    # the run -------------------------------------------------------------------------------------
    def run(self, generations: int, budget_minutes: float | None) -> dict:
        setup = self.setup
        if self.state is None:
            rng = random.Random(setup.seed)
            pop = self.space.initial(rng, setup.population, self.key, near=setup.proxy_score == "short")
            self.state = {"format": 1, "setup": setup.to_json(), "generation": 0,
                          "population": [g.to_dict() for g in pop], "rng": _rng_state(rng),
                          "archive": {}, "full": {}, "eval": {}, "history": [], "elapsed_s": self.elapsed(),
                          "timing": {}, "stopped": None}
            self.save()
        self.log(f"search: {setup.model} at {setup.ratio:g}x, fitness on {setup.search_data} "
                 f"({setup.search_windows}x{setup.seq_len}, {self.fitness()}), "
                 f"starting at generation {self.state['generation']}")
        default = self.full_entry(self.default, keep=True)  # the reference, and a measured full cost
        self.log(f"default strategy (full config): search PPL {default['score']:.3f}")
        try:
            self._generations(generations, budget_minutes)
        finally:
            self.engine.close()
        return self._final()

    def _generations(self, generations: int, budget_minutes: float | None) -> None:
        state, setup = self.state, self.setup
        state["stopped"] = None
        while state["generation"] < generations:
            if budget_minutes is not None:
                last = state["history"][-1]["seconds"] if state["history"] else 0.0
                if self.elapsed() + last + self.reserve_s() > budget_minutes * 60:
                    state["stopped"] = "budget"
                    self.log(f"budget of {budget_minutes:g} min reached after {state['generation']} generations")
                    break
            t0 = time.perf_counter()
            gen = state["generation"]
            pop = [Genome.from_dict(d) for d in state["population"]]
            self.evaluate(pop, gen)
            new = sum(e["generation"] == gen for e in state["archive"].values())  # same after a resume
            scores = [state["archive"][self.key(g)]["score"] for g in pop]
            state["history"].append({"generation": gen, "best": min(scores),
                                     "median": stats_mod.median(scores), "evaluated": new,
                                     "seconds": time.perf_counter() - t0})
            rng = _rng_from(state["rng"])
            nxt = self.space.breed(pop, scores, rng, setup.population, self.key, set(state["archive"]))
            state["population"] = [g.to_dict() for g in nxt]
            state["rng"] = _rng_state(rng)
            state["generation"] = gen + 1
            self.save()
            kill_point("search-generation")
            self.log(f"generation {gen + 1}/{generations}: best {min(scores):.3f}, median "
                     f"{stats_mod.median(scores):.3f} ({new} scored, {time.perf_counter() - t0:.0f} s, "
                     f"{self.elapsed() / 60:.1f} min in all)")
        if state["stopped"] is None:
            state["stopped"] = "generations"
        self.save()

    def fitness(self) -> str:
        if not self.setup.proxy:
            return "full config"
        if not self.setup.order_windows:
            return "proxy: sequential=False"
        if self.setup.proxy_score == "short":
            steps = self.setup.short_config(self.default).strategy.refine_steps
            return (f"proxy: short sequential compression ({self.setup.order_windows}x{self.setup.order_seq_len} "
                    f"calibration, refinement {steps} steps)")
        return (f"proxy: sequential=False x order score ({self.setup.order_windows}x{self.setup.order_seq_len} "
                "sequential, relative to the default order)")

    def order_scores(self) -> list[dict]:
        """The short scores of the default genes in each order scored, the default order included (the
        truncation proxy's order scores), best first."""
        rows = []
        for entry in self.state.get("short", {}).values():
            g = Genome.from_dict(entry["genome"]) if "genome" in entry else None
            if g is not None and replace(g, order=self.default.order) == self.default:
                rows.append({"order": describe_order(list(g.order)), "score": entry["score"],
                             "seconds": entry["seconds"]})
        return sorted(rows, key=lambda r: r["score"])

    def ranked(self) -> list[dict]:
        return sorted(self.state["archive"].values(),
                      key=lambda e: (e["score"], Genome.from_dict(e["genome"]).full_key()))

    def _final(self) -> dict:
        state, setup = self.state, self.setup
        ranked = self.ranked()
        candidates = [Genome.from_dict(e["genome"]) for e in ranked[: setup.top_k]]
        if self.default.full_key() not in {g.full_key() for g in candidates}:
            candidates.append(self.default)
        best_key, best = None, None
        for g in candidates:
            entry = self.full_entry(g, keep=True)
            if best is None or entry["score"] < best["score"]:
                best_key, best = g.full_key(), entry
            self._keep_only(best_key, self.default.full_key())
            self.log(f"full re-score {g.describe()}: search PPL {entry['score']:.3f}")
        winner = Genome.from_dict(best["genome"])
        for g in dict.fromkeys([winner, self.default]):
            if self.eval_windows is not None and g.full_key() not in state["eval"]:
                state["eval"][g.full_key()] = self.engine.eval_ppl(g, self.models.get(g.full_key()), self.eval_windows)
                self.save()
        self._keep_only()
        return self._write_outputs(winner, candidates)

    def _keep_only(self, *keys: str) -> None:
        """Release the full re-scores' handles other than those of ``keys``."""
        self.engine.release([h for k, h in self.models.items() if k not in keys])
        self.models = {k: h for k, h in self.models.items() if k in keys}

    def _write_outputs(self, winner: Genome, candidates: list[Genome]) -> dict:
        state, setup = self.state, self.setup
        cfg = winner.config(setup, full=True)
        full, ev = state["full"], state["eval"]
        default_key, winner_key = self.default.full_key(), winner.full_key()
        rows = []
        for e in self.ranked():
            g = Genome.from_dict(e["genome"])
            rows.append({"genome": e["genome"], "describe": g.describe(), "fitness": e["score"],
                         "full_search_ppl": full.get(g.full_key(), {}).get("score"),
                         "generation": e.get("generation"), "default": g.full_key() == default_key})
        ratio = full[winner_key]["ratio_reached"]
        cli = (f"vac compress {setup.model} --strategy {self.out / 'strategy.json'} --out OUT --calib "
               f"'{setup.calib}' --calib-windows {setup.calib_windows} --fisher-windows {setup.fisher_windows} "
               f"--seq-len {setup.seq_len}" + (f" --eval '{setup.eval_data}' --eval-windows {setup.eval_windows}"
                                              if setup.eval_data else " --eval ''"))
        summary = {
            "setup": setup.to_json(), "generations_done": state["generation"], "stopped": state["stopped"],
            "minutes": self.elapsed() / 60, "fitness": self.fitness(),
            "protocol": f"PPL over non-overlapping windows of {setup.seq_len} tokens, all shifted tokens scored, "
                        f"use_cache=False; search: first {setup.search_windows} windows of {setup.search_data}; "
                        f"eval: first {setup.eval_windows} windows of {setup.eval_data or '(skipped)'}",
            "winner": {"genome": winner.to_dict(), "describe": winner.describe(), "config": cfg.strategy.to_dict(),
                       "search_ppl": full[winner_key]["score"], "eval_ppl": ev.get(winner_key),
                       "ratio_reached": ratio, "is_default": winner_key == default_key},
            "default": {"search_ppl": full[default_key]["score"], "eval_ppl": ev.get(default_key),
                        "proxy_fitness": state["archive"].get(self.key(self.default), {}).get("score"),
                        "ratio_reached": full[default_key]["ratio_reached"]},
            "final_candidates": [{"describe": g.describe(), "genome": g.to_dict(),
                                  "search_ppl": full[g.full_key()]["score"]} for g in candidates],
            "history": state["history"], "top": rows[:20], "evaluated": len(rows),
            "orders": self.order_scores(),
            "reproduce": cli,
        }
        strategy = {"format": FORMAT, "config": cfg.strategy.to_dict(), "data": cfg.data.to_dict(),
                    "search": {k: summary[k] for k in ("protocol", "fitness", "generations_done", "minutes")}
                    | {"model": setup.model, "ratio_reached": ratio, "search_ppl": summary["winner"]["search_ppl"],
                       "eval_ppl": summary["winner"]["eval_ppl"], "default": summary["default"],
                       "reproduce": cli}}
        write_json(self.out / "strategy.json", strategy)
        write_json(self.out / "search.json", summary)
        atomic_write(self.out / "fitness.png", fitness_png(summary))
        return summary


def run_search(setup: SearchSetup, out: Path | str, generations: int = 10, budget_minutes: float | None = None,
               workers: int = 1, progress: bool = True, log: Callable[[str], None] = log_stderr) -> dict:
    """Run (or resume) the search in ``out``; returns the summary also written to ``out/search.json``."""
    if generations < 1:
        raise VacError(f"--generations must be at least 1, got {generations}")
    if workers < 1:
        raise VacError(f"--workers must be at least 1, got {workers}")
    if budget_minutes is not None and not budget_minutes > 0:
        raise VacError(f"--budget-minutes must be positive, got {budget_minutes:g}")
    check_sources(setup.calib, setup.search_data, setup.eval_data)
    check_output(out, setup.inputs())
    return _Run(setup, Path(out), workers, progress, log).run(generations, budget_minutes)


# ----------------------------------------------------------------------------- strategy files


def load_strategy(path: Path | str) -> StrategyConfig:
    """The :class:`~vac.config.StrategyConfig` of a strategy file written by ``vac search``, validated
    field by field (the data options are left to the caller; data fields that files of earlier
    versions carried in ``config`` are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise VacError(f"no such strategy file: {path}")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise VacError(f"strategy file {path} is not valid JSON") from None
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict):
        raise VacError(f"{path} is not a vac strategy file (no 'config' object)")
    data_fields = {f.name for f in fields(DataConfig)}
    return StrategyConfig.from_dict({k: v for k, v in config.items() if k not in data_fields},
                                    where=f"strategy file {path}")


# ----------------------------------------------------------------------------- reports


def fitness_png(summary: dict) -> bytes:
    """PNG of the best and median fitness per generation (and the default's proxy fitness)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = summary["history"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [h["generation"] for h in hist]
    ax.plot(xs, [h["best"] for h in hist], marker="o", label="best")
    ax.plot(xs, [h["median"] for h in hist], marker=".", ls="--", label="median")
    if summary["default"].get("proxy_fitness") is not None:
        ax.axhline(summary["default"]["proxy_fitness"], color="grey", ls=":", label="default")
    s = summary["setup"]
    ax.set_xlabel("generation")
    ax.set_ylabel(f"PPL on {s['search_data']} ({summary['fitness'].split(':')[0]})")
    ax.set_title(f"{Path(s['model']).name} at {s['ratio']:g}x", fontsize=9)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def top_table(summary: dict, n: int = 10):
    """A rich table of the best genomes by fitness."""
    from rich.table import Table

    table = Table(title=f"top genomes ({summary['evaluated']} scored, fitness: {summary['fitness']})",
                  show_edge=False)
    for col in ("#", "method", "exp", "split", "allocation", "type weights", "order", "fitness", "full"):
        table.add_column(col, justify="right" if col in ("#", "fitness", "full") else "left")
    for i, row in enumerate(summary["top"][:n], 1):
        d = row["describe"]
        full = row["full_search_ppl"]
        table.add_row(str(i) + ("*" if row["default"] else ""), d["method"], d["exponent"], d["split"],
                      d["allocation"], d["weights"], d["order"], f"{row['fitness']:.3f}", "-" if full is None else f"{full:.3f}")
    return table
