"""Strategy search: budget exactness, cached factors = the pipeline, determinism, resume, split hygiene."""

import copy
import json
import random
from dataclasses import replace

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer, word_text
from typer.testing import CliRunner

import vac.cli.search  # noqa: F401  (registers the command)
from vac.cli import app
from vac.config import DEFAULT_CALIB, DEFAULT_EVAL, DEFAULT_SEARCH, CompressConfig
from vac.core.driver import allocate, compress, sequential_passes
from vac.core.evaluate import perplexity
from vac.core.orders import layer_order
from vac.data.corpora import CORPORA, SPLIT_DOCS
from vac.data.specs import source_units
from vac.data.windows import eval_windows, sample_windows
from vac.errors import VacError
from vac.models.zoo import load_model
from vac.search.run import load_strategy, rescore_seconds, run_search
from vac.search.scoring import FactorCache, ProxyScorer, search_statistics
from vac.search.space import Genome, SearchSetup, Space, check_sources, feasible_shares

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread avoids OpenMP spin contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    tiny_llama(layers=4).save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    for name, seed, n in (("calib", 1, 3000), ("search", 3, 1500), ("eval", 2, 1500)):
        (root / f"{name}.txt").write_text(word_text(n, seed=seed))
    return root


def setup_for(files, **kw) -> SearchSetup:
    base = dict(model=str(files / "tiny"), ratio=1.5, population=4, calib=str(files / "calib.txt"),
                search_data=str(files / "search.txt"), eval_data=str(files / "eval.txt"), calib_windows=8,
                fisher_windows=4, seq_len=32, search_windows=4, eval_windows=4, rank_step=4, rank_floor=4,
                order_windows=4, order_seq_len=32, proxy_score="truncation")
    if kw.get("proxy") is False:
        base["order_windows"] = 0
    return SearchSetup(**base | kw)


@pytest.fixture(scope="module")
def parts(files, tmp_path_factory):
    setup = setup_for(files)
    model, tok = load_model(setup.model)
    calib = sample_windows(tok, setup.calib, setup.seq_len, setup.calib_windows, seed=0)
    windows = eval_windows(tok, setup.search_data, setup.seq_len, setup.search_windows)
    folder = tmp_path_factory.mktemp("cache")
    proxy, seq = search_statistics(model, calib, setup, setup.model, progress=False)
    factors = FactorCache(folder, model, proxy)
    return dict(setup=setup, model=model, calib=calib, windows=windows, proxy=proxy, seq=seq,
                factors=factors, scorer=ProxyScorer(model, windows, setup, factors), folder=folder)


def test_random_genomes_meet_the_budget(parts):
    setup, model, scorer = parts["setup"], parts["model"], parts["scorer"]
    shares = feasible_shares(model, setup)
    assert 1.0 in shares
    # at 3x, k/v (32×64) cannot pass 5.3x at the rank floor 4: shares ≥ 3 (attention ≥ 7x) drop out
    assert feasible_shares(model, replace(setup, ratio=3.0)) == (0.5, 1.0, 1.5, 1.75, 2.0, 2.5)
    space, rng = Space(4, shares=shares), random.Random(5)
    dense = sum(m.dense_params for m in scorer.matrices)
    known, svds = set(parts["factors"].spectra_memo), parts["factors"].svds
    genomes = [space.random(rng) for _ in range(12)]
    genomes += [space.mutate(g, rng) for g in genomes] + [Genome.default(4)]
    for i, g in enumerate(genomes):
        cfg, ranks = scorer.allocation(g)
        after = sum(m.params(ranks[m.path]) for m in scorer.matrices)
        assert after <= dense / setup.ratio
        if g.allocation == "global":  # the knapsack: within one rank step per component
            assert dense / setup.ratio - after <= 2 * (scorer.step_cost + 1)
        if i % 3 == 0 or g.allocation == "uniform":  # the cached spectra allocate exactly like the pipeline
            assert ranks == allocate(model, parts["proxy"], cfg)
    assert {g.allocation for g in genomes} == {"uniform", "depth", "global"}
    sets = {FactorCache.name(g.method, g.exponent) for g in genomes}
    # one SVD per (matrix, method, exponent), none per candidate
    assert parts["factors"].svds - svds == len(sets - known) * len(scorer.matrices)


def test_order_mutations_stay_in_the_outward_family():
    from vac.core.orders import layer_order, outward, outward_gene

    n = 6
    family = {tuple(outward(n, s, up)) for s in range(n) for up in (True, False)}
    assert {tuple(layer_order(name, n)) for name in ("front-to-back", "back-to-front", "middle-out")} <= family
    assert len(family) == 2 * n - 2  # the ends have one side only
    assert all(tuple(outward(n, *outward_gene(o))) == o for o in family)
    assert outward_gene((1, 0, 3, 2, 5, 4)) is None
    space, rng = Space(n), random.Random(3)
    g = Genome((1, 0, 3, 2, 5, 4))  # outside the family: mutation brings it in
    seen = set()
    for _ in range(40):
        g = replace(g, order=space._mutate_order(g.order, rng))
        assert g.order in family
        seen.add(g.order)
    assert len(seen) > n  # the family is explored, not one order


def prepared_engine(setup: SearchSetup, folder):
    """``(engine, search windows, short windows)``: an in-memory engine with the full run's statistics."""
    from vac.search.scoring import InMemoryEngine

    engine = InMemoryEngine(setup, folder, progress=False)
    tok = engine.tokenizer
    calib = sample_windows(tok, setup.calib, setup.seq_len, setup.calib_windows, seed=0)
    windows = eval_windows(tok, setup.search_data, setup.seq_len, setup.search_windows)
    engine.prepare(calib, windows)
    return engine, windows, setup.order_calibration(tok)


def test_order_score_distinguishes_orders_and_enters_the_fitness(files, tmp_path):
    """The order score is a sequential compression (the default genes) from the order windows with the
    full run's dense statistics: two orders of the same genes score differently, exactly as the pipeline
    compresses them, and two genomes that differ only in the order get fitnesses in the ratio of their
    order scores (the truncation proxy)."""
    setup = setup_for(files)
    engine, windows, small = prepared_engine(setup, tmp_path / "cache")
    front, back = Genome.default(4), replace(Genome.default(4), order=(3, 2, 1, 0))
    scores = [engine.short_score(g, small)["score"] for g in (front, back)]
    assert scores[0] != pytest.approx(scores[1], rel=1e-3), scores
    net = copy.deepcopy(engine.model)
    cfg = setup.short_config(back)  # back's genes, the short windows, the refinement at order_refine_steps
    assert cfg.strategy == replace(back.strategy(setup.ratio, full=True, **setup.grid()), refine_steps=8)
    compress(net, small, cfg, progress=False, stats=engine.seq_stats)  # with the full run's dense statistics
    assert scores[1] == pytest.approx(perplexity(net, windows, progress=False)["ppl"], rel=1e-5)

    summary = run_search(setup, tmp_path / "s", generations=2, progress=False, log=lambda _m: None)
    state = json.loads((tmp_path / "s" / "state.json").read_text())
    orders = state["short"]  # the order scores: short scores of the default genes in each order
    in_order = lambda order: replace(Genome.default(4), order=tuple(order)).full_key()  # noqa: E731
    base = orders[in_order(Genome.default(4).order)]["score"]
    for entry in state["archive"].values():
        order = orders[in_order(entry["genome"]["order"])]["score"]
        assert entry["score"] == pytest.approx(entry["truncation"] * order / base, rel=1e-12)
    assert len(summary["orders"]) == len(orders) >= 2 and "order score" in summary["fitness"]
    assert [o["score"] for o in summary["orders"]] == sorted(o["score"] for o in orders.values())


def test_short_proxy_scores_every_gene_by_a_short_refined_compression(files, tmp_path):
    """``proxy_score="short"``: a genome's fitness is its own short sequential compression (every gene,
    the refinement at ``order_refine_steps``), exactly as the pipeline compresses it from the order
    windows; genes other than the order change it."""
    setup = setup_for(files, proxy_score="short", order_refine_steps=3, population=3)
    engine, windows, small = prepared_engine(setup, tmp_path / "cache")
    default = Genome.default(4)
    other = replace(default, exponent=1.0, attn=1.0)
    scores = [engine.short_score(g, small)["score"] for g in (default, other)]
    assert scores[0] != pytest.approx(scores[1], rel=1e-3), scores
    cfg = setup.short_config(other)
    assert cfg.strategy.refine_steps == 3 and cfg.strategy.refine == "dense" and cfg.data.seq_len == 32
    net = copy.deepcopy(engine.model)
    compress(net, small, cfg, progress=False, stats=engine.seq_stats)
    assert scores[1] == pytest.approx(perplexity(net, windows, progress=False)["ppl"], rel=1e-5)

    summary = run_search(setup, tmp_path / "s", generations=1, progress=False, log=lambda _m: None)
    state = json.loads((tmp_path / "s" / "state.json").read_text())
    assert len(state["archive"]) == 3 and "proxy" not in state  # no truncation score was made
    for key, entry in state["archive"].items():
        assert entry["score"] == state["short"][key]["score"]
    assert state["short"][default.full_key()]["score"] == pytest.approx(scores[0], rel=1e-9)
    for entry in state["archive"].values():  # the first population: the default and its mutants
        g = Genome.from_dict(entry["genome"])
        genes = ("order", "method", "exponent", "attn", "allocation")
        changed = [f for f in genes if getattr(g, f) != getattr(default, f)]
        changed += [k for k, w in enumerate(g.log_weights) if w != 0]
        assert len(changed) <= 2 and (len(changed) >= 1 or g == default), changed
    assert "short sequential compression" in summary["fitness"]
    with pytest.raises(VacError, match="--proxy-score must be one of truncation, short"):
        setup_for(files, proxy_score="full")
    with pytest.raises(VacError, match="--proxy-score short needs --order-windows above 0"):
        setup_for(files, proxy_score="short", order_windows=0)


def test_order_score_needs_the_proxy_search(files):
    assert setup_for(files, order_windows=None).order_windows == 8  # the default, in memory or streamed
    assert setup_for(files, streamed=True, order_windows=None).order_windows == 8
    assert setup_for(files, proxy=False, order_windows=None).order_windows == 0
    with pytest.raises(VacError, match="--order-windows needs the proxy search"):
        setup_for(files, proxy=False, order_windows=4)
    with pytest.raises(VacError, match="--order-windows must be at least 0"):
        setup_for(files, order_windows=-1)


def test_proxy_scoring_equals_the_pipeline_without_new_svds(parts):
    setup, model, scorer = parts["setup"], parts["model"], parts["scorer"]
    g = Genome((3, 2, 1, 0), "vac", 0.5, 0.5, "global", (0.0, 1.0, 0.0, -0.5, 0.0, 0.0, 0.5))
    scorer.score(g)
    svds = parts["factors"].svds
    ours = scorer.score(Genome((0, 1, 2, 3), *[getattr(g, f) for f in ("method", "exponent", "attn", "allocation", "log_weights")]))
    assert parts["factors"].svds == svds  # a rank change is a truncation of cached factors
    cfg = g.config(setup, full=False)
    net = copy.deepcopy(model)
    result = compress(net, parts["calib"], cfg, progress=False, stats=parts["proxy"])
    ref = perplexity(net, parts["windows"], progress=False)["ppl"]
    assert ours["params_after"] == result.params_after
    assert ours["score"] == pytest.approx(ref, rel=1e-5)


def test_scoring_leaves_the_model_dense_without_copying_it(parts, monkeypatch):
    """Proxy and full scoring compress the search's one model in place and restore it (no deepcopy per
    candidate); the full candidate's modules, applied again, give the same perplexity."""
    from vac.models.layers import applied
    from vac.search.scoring import full_compress

    model, scorer = parts["model"], parts["scorer"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cls = type(model)
    real = copy.deepcopy

    def no_module_copies(obj, *a, **k):
        if isinstance(obj, torch.nn.Module):
            pytest.fail(f"a {type(obj).__name__} was deep-copied")
        return real(obj, *a, **k)

    monkeypatch.setattr(copy, "deepcopy", no_module_copies)
    scored = scorer.score(Genome.default(4))
    cfg = Genome.default(4).config(parts["setup"], full=True)
    modules, result = full_compress(model, parts["calib"], parts["seq"], cfg, scorer.step_cost)
    assert type(model) is cls and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(modules) == len(result.ranks) and scored["score"] > 0
    with applied(model, modules) as net:
        once = perplexity(net, parts["windows"], progress=False)["ppl"]
    monkeypatch.undo()
    net = copy.deepcopy(model)
    compress(net, parts["calib"], cfg, progress=False, stats=parts["seq"])
    assert once == pytest.approx(perplexity(net, parts["windows"], progress=False)["ppl"], rel=1e-6)
    assert type(model) is cls


def strip(obj):
    """The state without wall-clock fields."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in ("seconds", "elapsed_s", "timing", "minutes")}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def state(folder):
    return strip(json.loads((folder / "state.json").read_text()))


def assert_same_search(straight, other):
    """Same populations, scores, RNG and result; ``other`` may hold more memoized final-stage scores
    (a run stopped early re-scored its own top-k), which never change a result."""
    a, b = state(straight), state(other)
    for memo in ("full", "eval"):
        mine, theirs = a.pop(memo), b.pop(memo)
        assert mine == {k: theirs[k] for k in mine}
    assert a == b


def test_deterministic_and_resume_equals_uninterrupted(files, tmp_path, monkeypatch):
    setup = setup_for(files, seed=7)
    quiet = dict(progress=False, log=lambda _m: None)
    straight = run_search(setup, tmp_path / "a", generations=3, **quiet)
    again = run_search(setup, tmp_path / "b", generations=3, **quiet)
    assert state(tmp_path / "a") == state(tmp_path / "b")
    assert strip(straight) | {"reproduce": 0} == strip(again) | {"reproduce": 0}
    assert [h["evaluated"] for h in straight["history"]][0] == setup.population

    run_search(setup, tmp_path / "c", generations=1, **quiet)  # stop after one generation, then continue
    resumed = run_search(setup, tmp_path / "c", generations=3, **quiet)
    assert_same_search(tmp_path / "a", tmp_path / "c")
    assert resumed["winner"] == straight["winner"]
    assert resumed["final_candidates"] == straight["final_candidates"]

    calls = {"n": 0}
    real = ProxyScorer.score

    def dying(self, g):  # a kill in the middle of the second generation
        calls["n"] += 1
        if calls["n"] == setup.population + 2:
            raise KeyboardInterrupt
        return real(self, g)

    monkeypatch.setattr(ProxyScorer, "score", dying)
    with pytest.raises(KeyboardInterrupt):
        run_search(setup, tmp_path / "d", generations=3, **quiet)
    monkeypatch.setattr(ProxyScorer, "score", real)
    partial = json.loads((tmp_path / "d" / "state.json").read_text())
    # the second generation's first truncation was recorded (and any genome of it that differs from one
    # scored before only in its order), the one that died was not
    assert partial["generation"] == 1 and setup.population < len(partial["archive"]) < 2 * setup.population
    run_search(setup, tmp_path / "d", generations=3, **quiet)
    assert_same_search(tmp_path / "a", tmp_path / "d")

    other = run_search(setup_for(files, seed=8), tmp_path / "e", generations=1, **quiet)
    assert other["top"] != straight["top"]


def test_strategy_file_reproduces_the_winner_through_the_pipeline(files, tmp_path, parts):
    setup = setup_for(files, population=3, top_k=2)
    summary = run_search(setup, tmp_path / "s", generations=2, progress=False, log=lambda _m: None)
    strategy = load_strategy(tmp_path / "s" / "strategy.json")
    assert not hasattr(strategy, "calib") and strategy.ratio == setup.ratio and strategy.sequential is True
    cfg = CompressConfig(strategy, setup.data_config())
    net = copy.deepcopy(parts["model"])
    result = compress(net, parts["calib"], cfg, progress=False)  # its own statistics, like `vac compress`
    assert result.ratio == pytest.approx(summary["winner"]["ratio_reached"])
    assert result.ratio >= setup.ratio
    ppl = perplexity(net, parts["windows"], progress=False)["ppl"]
    assert ppl == pytest.approx(summary["winner"]["search_ppl"], rel=1e-4)
    assert summary["winner"]["search_ppl"] <= summary["default"]["search_ppl"]  # the default is a finalist
    assert summary["winner"]["eval_ppl"] > 1 and summary["default"]["eval_ppl"] > 1
    assert (tmp_path / "s" / "fitness.png").read_bytes()[:4] == b"\x89PNG"

    (tmp_path / "bad.json").write_text('{"config": {"ratio": 1.5, "nope": 1}}')
    for path, message in ((tmp_path / "missing.json", "no such strategy"), (tmp_path / "bad.json", "unknown fields")):
        with pytest.raises(VacError, match=message):
            load_strategy(path)
    (tmp_path / "low.json").write_text('{"config": {"ratio": 0.5}}')
    with pytest.raises(VacError, match="greater than 1"):
        load_strategy(tmp_path / "low.json")


def test_builtin_search_splits_never_overlap_calibration_or_evaluation():
    check_sources(DEFAULT_CALIB, DEFAULT_SEARCH, DEFAULT_EVAL)  # does not load any corpus
    for corpus in CORPORA:
        splits = SPLIT_DOCS[corpus]
        assert splits["search"], corpus
        units = {s: set(source_units(f"{corpus}:{s}")) for s in ("calib", "search", "eval")}
        assert not units["search"] & units["calib"] and not units["search"] & units["eval"]
        assert len(units["search"]) == len(splits["search"])
    for search, evaluation in (("austen:eval", DEFAULT_EVAL), ("austen", DEFAULT_EVAL),
                               ("web-bible:search+austen:eval", "austen:eval")):
        with pytest.raises(VacError, match="overlaps the evaluation data"):
            check_sources(DEFAULT_CALIB, search, evaluation)
    with pytest.raises(VacError, match="overlaps the calibration data"):
        check_sources(DEFAULT_CALIB, "shakespeare:calib", DEFAULT_EVAL)


def search_args(files, out, *extra):
    return ["search", files / "tiny", "--out", out, "--ratio", 1.5, "--calib", files / "calib.txt", "--eval",
            files / "eval.txt", "--search-data", files / "search.txt", "--seq-len", 32, "--calib-windows", 8,
            "--fisher-windows", 4, "--search-windows", 4, "--eval-windows", 4, "--rank-step", 4,
            "--rank-floor", 4, "--population", 3, "--generations", 1, "--top-k", 1, "--order-windows", 4,
            "--order-seq-len", 32, *extra]


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_refuses_overlapping_search_data(files, tmp_path):
    (tmp_path / "copy.txt").write_text((files / "eval.txt").read_text())
    for data in (files / "eval.txt", tmp_path / "copy.txt", files / "calib.txt"):
        args = search_args(files, tmp_path / "out")
        args[args.index("--search-data") + 1] = data
        code, _, err = cli(*args)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "overlaps" in lines[0] and "Traceback" not in err
        assert not (tmp_path / "out").exists()
    code, _, err = cli("search", files / "tiny", "--out", tmp_path / "out", "--search-data", "austen:eval")
    assert code == 2 and "overlaps the evaluation data 'austen:eval'" in err


def test_cli_search_and_ablation(files, tmp_path):
    code, out, err = cli(*search_args(files, tmp_path / "run"))
    assert code == 0, err
    assert "top genomes" in out and "strategy.json" in out
    assert {"strategy.json", "search.json", "fitness.png", "state.json"} <= {p.name for p in (tmp_path / "run").iterdir()}
    code, out, err = cli(*search_args(files, tmp_path / "run", "--population", 5))
    assert code == 2 and "other settings (population)" in err
    code, out, err = cli(*search_args(files, tmp_path / "abl", "--ablation"))
    assert code == 0, err
    doc = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert [r["study"] for r in doc["rows"]].count("exponent") == 5 and len(doc["rows"]) == 14
    assert all(r["ratio_reached"] >= 1.5 for r in doc["rows"])
    assert sum(r["default"] for r in doc["rows"]) == 4  # the default is one compression, shown in each study
    assert len(doc["results"]) == 11
    assert "| order | back-to-front |" in (tmp_path / "abl" / "ablation.md").read_text()


@pytest.mark.slow  # spawns two Python processes that import torch (about a minute on a busy 2-core box)
def test_parallel_workers_score_like_one_process(files, tmp_path):
    setup = setup_for(files, population=4, seed=3)
    quiet = dict(progress=False, log=lambda _m: None)
    one = run_search(setup, tmp_path / "one", generations=1, **quiet)
    two = run_search(setup, tmp_path / "two", generations=1, workers=2, **quiet)
    assert [r["fitness"] for r in two["top"]] == pytest.approx([r["fitness"] for r in one["top"]], rel=1e-5)


def test_compress_accepts_the_strategy_file(files, tmp_path):
    import inspect

    from vac.cli import compress as cli_module

    if "strategy_file" not in inspect.signature(cli_module.compress).parameters:
        pytest.skip("vac compress has no --strategy option yet (the cli.py patch)")
    code, _, err = cli(*search_args(files, tmp_path / "run"))
    assert code == 0, err
    winner = json.loads((tmp_path / "run" / "search.json").read_text())["winner"]
    code, _, err = cli("compress", files / "tiny", "--out", tmp_path / "c", "--strategy", tmp_path / "run" / "strategy.json",
                       "--calib", files / "calib.txt", "--calib-windows", 8, "--fisher-windows", 4, "--seq-len", 32,
                       "--eval", files / "search.txt", "--eval-windows", 4, "--ratio", 3, "--method", "svd")
    assert code == 0, err
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["config"] == winner["config"]  # the strategy replaces --ratio and --method
    assert report["ppl_after"]["ppl"] == pytest.approx(winner["search_ppl"], rel=1e-4)


def test_rescore_estimate_prices_the_layer_order():
    """The budget stop must see that a middle-out re-score re-runs far more layer passes."""
    timing = {"full_compress_s": 200.0, "search_ppl_s": 10.0, "full_passes": 29, "pass_s": 2.0}
    assert rescore_seconds(list(range(30)), timing) == 210.0
    middle = rescore_seconds(layer_order("middle-out", 30), timing)
    assert middle == 210.0 + 2.0 * (sequential_passes(layer_order("middle-out", 30)) - 29) > 700
    assert rescore_seconds(list(range(30)), {}) == 0.0  # nothing measured yet
