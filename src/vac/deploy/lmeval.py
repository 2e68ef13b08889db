"""Bridge to lm-evaluation-harness (``pip install 'vac[eval]'``), run offline on an in-memory model.

``local-ppl`` is a task vac defines itself: the documents of a vac text source (default
``austen:eval``) are cut at blank lines into passages of at most ``chunk_chars`` characters, written
to a local jsonl file, and scored with lm-eval's ``loglikelihood_rolling`` (metrics word_perplexity,
byte_perplexity, bits_per_byte). Each passage is scored on its own, in rolling windows of the
model's ``max_length``. ``--limit N`` takes the first N passages. Other names are passed to
lm-eval's task registry; those need their data sets in the local Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..atomic import atomic_write, write_json
from ..config import DEFAULT_EVAL
from ..errors import VacError

LOCAL_PPL = "local-ppl"
LOCAL_TASKS = (LOCAL_PPL,)
PPL_METRICS = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
               "bits_per_byte": "bits_per_byte"}


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as exc:
        raise VacError(f"lm-eval is not installed ({exc.name or exc}): pip install 'vac[eval]'") from None
    return lm_eval


def passages(docs: list[tuple[str, str]], chunk_chars: int) -> list[tuple[str, str]]:
    """Documents cut at blank lines into ``(label, text)`` passages of at most ``chunk_chars``
    characters (a longer paragraph stays whole); ``chunk_chars`` 0 keeps documents whole."""
    if chunk_chars < 0:
        raise VacError(f"--chunk-chars must be >= 0, got {chunk_chars}")
    out: list[tuple[str, str]] = []
    for label, text in docs:
        if not chunk_chars:
            out.append((label, text.strip()))
            continue
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        current: list[str] = []
        size = 0
        for para in paragraphs:
            if current and size + 2 + len(para) > chunk_chars:
                out.append((f"{label}#{len(out)}", "\n\n".join(current)))
                current, size = [], 0
            current.append(para)
            size += len(para) + (2 if size else 0)
        if current:
            out.append((f"{label}#{len(out)}", "\n\n".join(current)))
    return out


def local_ppl_task(data: str = DEFAULT_EVAL, chunk_chars: int = 4000) -> tuple[dict, int]:
    """(lm-eval task config, number of passages) for the ``local-ppl`` task on ``data``.

    The passages go to a jsonl file in vac's cache, named by its content."""
    from ..cache import cache_dir
    from ..data.specs import read_source

    items = passages(read_source(data), chunk_chars)
    body = "".join(json.dumps({"text": text, "label": label}) + "\n" for label, text in items)
    path = cache_dir() / "lmeval" / f"{hashlib.sha256(body.encode()).hexdigest()[:24]}.jsonl"
    if not path.is_file():
        atomic_write(path, body)
    config = {
        "task": LOCAL_PPL,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "output_type": "loglikelihood_rolling",
        "test_split": "test",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in PPL_METRICS.items()],
        "metadata": {"version": 1.0, "data": data, "chunk_chars": chunk_chars},
    }
    return config, len(items)


def _metrics(result: dict) -> dict:
    """lm-eval's ``{"metric,filter": value}`` → ``{"metric": value}`` (stderrs kept when computed)."""
    out = {}
    for key, value in result.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, flt = key.partition(",")
        out[metric if flt == "none" else f"{metric} ({flt})"] = value
    return out


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | float | None = None,
    *,
    data: str = DEFAULT_EVAL,
    chunk_chars: int = 4000,
    batch_size: int = 1,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    quiet: bool = True,
) -> dict:
    """Run lm-eval ``tasks`` on an in-memory HF ``model``; returns a JSON-ready dict:
    ``{"tasks": {task: {metric: value}}, "samples": {task: {"original", "effective"}}, "protocol", ...}``.
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise VacError(f"no tasks given; e.g. --tasks {LOCAL_PPL}")
    if tokenizer is None:
        raise VacError("the model has no tokenizer")
    if limit is not None and limit <= 0:
        raise VacError(f"--limit must be positive, got {limit}")
    specs: list = []
    n_passages = None
    for task in tasks:
        if task == LOCAL_PPL:
            config, n_passages = local_ppl_task(data, chunk_chars)
            specs.append(config)
        else:
            specs.append(task)
    if quiet:
        for name in ("lm_eval", "lm-eval"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        manager = TaskManager(include_defaults=any(isinstance(s, str) for s in specs))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                  device=str(next(model.parameters()).device))
        results = lm_eval.simple_evaluate(
            model=lm, tasks=specs, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
            log_samples=False, bootstrap_iters=0,
        )
    except VacError:
        raise
    except Exception as exc:  # unknown task names, data sets missing offline, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VacError(f"lm-eval failed: {type(exc).__name__}: {first}") from exc
    out = {
        "tasks": {name: _metrics(r) for name, r in results["results"].items()},
        "samples": results.get("n-samples", {}),
        "limit": limit,
        "max_length": lm.max_length,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }
    if n_passages is not None:
        used = out["samples"].get(LOCAL_PPL, {}).get("effective", n_passages)
        out["data"] = data
        out["chunk_chars"] = chunk_chars
        cut = (f"cut at blank lines, at most {chunk_chars} characters each" if chunk_chars
               else "whole documents")
        out["protocol"] = (f"{LOCAL_PPL}: the first {used} of {n_passages} passages of {data} ({cut}), "
                           f"each scored alone with loglikelihood_rolling in windows of up to "
                           f"{lm.max_length} tokens")
    return out


def save_results(folder: str | os.PathLike, results: dict) -> Path:
    """Write ``folder/lm_eval.json`` atomically (read by ``vac card``)."""
    return write_json(Path(folder) / "lm_eval.json", results, indent=2)
