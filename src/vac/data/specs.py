"""The one data-spec grammar of vac: parse, read, and check that two specs share no document.

A spec is one source or several joined with ``+``: a built-in corpus (``NAME`` or ``NAME:SPLIT``, see
:mod:`vac.data.corpora`), a local ``.txt`` file (one doc), ``.jsonl`` file (one doc per line, field
``text``) or folder of those (recursive, sorted), or ``hf:DATASET[:CONFIG]:SPLIT`` (column ``text``,
needs ``datasets``). A path that exists is taken whole, even when it contains ``+``. Compress, search
and distill all parse specs here and refuse overlapping sources with :func:`check_disjoint`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .corpora import CORPORA, SPLITS, VacDataError, load_corpus, split_docs


@dataclass(frozen=True)
class Part:
    """One source of a spec: ``kind`` is ``corpus``, ``path`` or ``hf``."""

    kind: str
    text: str
    name: str | None = None  # corpus name
    split: str | None = None  # corpus split (None: every document)



_SPEC_HELP = (
    f"a corpus ({', '.join(CORPORA)}) optionally with :{'|:'.join(SPLITS)}, an existing .txt/.jsonl file "
    "or folder, or hf:DATASET[:CONFIG]:SPLIT; join several with +"
)


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except UnicodeDecodeError:
        raise VacDataError(f"{path} is not UTF-8 text") from None


def jsonl_records(path: Path):
    """``(line number, parsed record)`` for each non-blank line of a UTF-8 jsonl file; a one-line
    VacDataError names the first line that is not JSON."""
    for number, line in enumerate(_read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except ValueError:
            raise VacDataError(f"{path}:{number} is not valid JSON") from None


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    docs = []
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            chat = isinstance(record, dict) and "messages" in record
            why = "has chat 'messages', which are not supported yet" if chat else "has no string field 'text'"
            raise VacDataError(f"{path}:{number} {why}; each line needs {{\"text\": ...}}")
        docs.append((f"{path}:{number}", record["text"]))
    return docs


def _read_path(path: Path) -> list[tuple[str, str]]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        if not files:
            raise VacDataError(f"folder {path} holds no .txt or .jsonl files")
        return [doc for f in files for doc in _read_path(f)]
    if path.suffix == ".txt":
        return [(str(path), _read_text_file(path))]
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    raise VacDataError(f"unsupported file type {path}; use .txt, .jsonl or a folder of them")


def _read_hf(spec: str) -> list[tuple[str, str]]:
    parts = spec[3:].split(":")  # checked by parse_spec
    dataset, config, split = parts[0], parts[1] if len(parts) == 3 else None, parts[-1]
    try:
        import datasets
    except ImportError:
        raise VacDataError(f"{spec} needs the `datasets` package: pip install datasets") from None
    try:
        rows = datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:  # the datasets library raises many unrelated types
        first_line = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
        raise VacDataError(f"cannot load {spec}: {first_line}") from None
    if "text" not in rows.column_names:
        raise VacDataError(f"{spec} has no 'text' column (columns: {', '.join(rows.column_names)})")
    return [(f"hf:{dataset}/{i}", text) for i, text in enumerate(rows["text"]) if isinstance(text, str)]


def _read_part(part: "Part") -> list[tuple[str, str]]:
    if part.kind == "corpus":
        docs = load_corpus(part.name)
        return [(f"{part.name}/{doc}", docs[doc]) for doc in split_docs(part.name, part.split)]
    if part.kind == "hf":
        return _read_hf(part.text)
    return _read_path(Path(part.text))


def parse_spec(spec: str) -> list[Part]:
    """The parts of a data spec; a one-line VacDataError for an empty or unknown part."""
    if not isinstance(spec, str) or not spec.strip():
        raise VacDataError(f"empty data spec; use {_SPEC_HELP}")
    texts = [spec] if Path(spec).exists() else [part.strip() for part in spec.split("+")]
    if not all(texts):
        raise VacDataError(f"empty part in data spec {spec!r}; use {_SPEC_HELP}")
    parts = []
    for text in texts:
        name, sep, split = text.partition(":")
        if name in CORPORA:
            split_docs(name, split if sep else None)  # validates the split
            parts.append(Part("corpus", text, name, split if sep else None))
        elif text.startswith("hf:"):
            fields = text[3:].split(":")
            if len(fields) not in (2, 3) or not all(fields):
                raise VacDataError(f"bad data spec {text!r}; use hf:DATASET[:CONFIG]:SPLIT")
            parts.append(Part("hf", text))
        elif Path(text).exists():
            parts.append(Part("path", text))
        else:
            raise VacDataError(f"unknown data source {text!r}: not {_SPEC_HELP}")
    return parts


def for_decisions(spec: str, what: str = "the scored text") -> str:
    """``spec``, refused (one line) when a part of it is a corpus's evaluation split or a whole corpus
    (which contains it): defaults, hyperparameters and search decisions are made on calibration or
    search splits, never on text that is reported as held out."""
    for part in parse_spec(spec):
        if part.kind == "corpus" and part.split in (None, "eval"):
            raise VacDataError(f"{what} '{part.text}' holds an evaluation split; decisions are made on "
                               f"{part.name}:search or {part.name}:calib")
    return spec


def read_source(spec: str) -> list[tuple[str, str]]:
    """Read the documents a data spec names, as ``[(doc_label, text)]``. Whitespace-only documents
    are skipped; a part with no text is an error."""
    docs: list[tuple[str, str]] = []
    for part in parse_spec(spec):
        found = [(label, text) for label, text in _read_part(part) if text.strip()]
        if not found:
            raise VacDataError(f"data source {part.text!r} holds no text")
        docs += found
    return docs


def source_units(spec: str) -> dict[str, str]:
    """The documents a data spec reads, as comparable ids: ``corpus/doc`` for built-in corpora (from
    ``corpora.SPLIT_DOCS``, without loading them), ``file:`` path and ``sha256:`` content for local
    files, the spec itself for ``hf:`` sources. Maps id → a human-readable label."""
    units: dict[str, str] = {}
    for part in parse_spec(spec):
        if part.kind == "corpus":
            for doc in split_docs(part.name, part.split):
                units[f"{part.name}/{doc}"] = f"{part.name}/{doc}"
        elif part.kind == "path":
            root = Path(part.text).resolve()
            files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
            for f in files:
                units[f"file:{f}"] = str(f)
                units["sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()] = f"{f} (by content)"
        else:
            units[part.text] = part.text
    return units


def check_disjoint(pairs) -> None:
    """``pairs`` of ``(role_a, spec_a, role_b, spec_b, option, hint)``: a one-line VacDataError when
    two specs share a document (empty specs are skipped)."""
    for a, spec_a, b, spec_b, option, hint in pairs:
        if not spec_a or not spec_b:
            continue
        ua, ub = source_units(spec_a), source_units(spec_b)
        common = [ua[u] for u in ua if u in ub]
        if common:
            raise VacDataError(
                f"{a} data '{spec_a}' overlaps the {b} data '{spec_b}' ({len(common)} shared documents, "
                f"e.g. {common[0]}); choose a disjoint {option}{hint}"
            )
