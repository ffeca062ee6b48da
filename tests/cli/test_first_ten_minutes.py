"""Issue 15, items 3, 5, 6, 7: what a new user sees in the first ten minutes.

Every bad input ends in one line on stderr (``error: ...``), a non-zero exit code and no traceback;
``ask`` refuses bad input before any model or index loads.
"""

from __future__ import annotations

import gzip
import json
import re
import time
from pathlib import Path

import pytest

from medrwr.cli import main
from medrwr.errors import IndexCorrupt, InputError, InputTypeError
from medrwr.retrieval import limits

PROGRESS = re.compile(r"\d+(doc|it)?\s*\[[0-9:]+(<[0-9:?]+)?, [^\]]*/s\]")  # tqdm: "3doc [00:00, 9.1doc/s]"

DOCS = [
    ("d1", "Cardiomegaly", "An enlarged heart on a chest radiograph: cardiothoracic ratio above one half."),
    ("d2", "Pneumothorax", "Air in the pleural space; a visceral pleural line without lung markings."),
    ("d3", "Pleural effusion", "Fluid in the pleural space blunts the costophrenic angle."),
]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    from medrwr.retrieval.index.corpus import Document
    from medrwr.retrieval.index.hybrid import build_index

    out = tmp_path_factory.mktemp("first10") / "ix"
    build_index([Document(i, t, x) for i, t, x in DOCS], out, dense=False, show_progress=False)
    return out


def _one_line_error(capsys, code: int, expected: int, *words: str) -> str:
    """The command failed with ``expected``; stderr is exactly one ``error:`` line holding ``words``
    (besides progress bars, which `index build` draws while it reads)."""
    out = capsys.readouterr()
    assert code == expected, out.err
    assert "Traceback" not in out.err + out.out
    lines = [ln for ln in out.err.strip().splitlines() if ln.strip() and not PROGRESS.search(ln)]
    assert len(lines) == 1, out.err
    err = lines[0]
    assert err.startswith("error: "), err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if `ask` gets as far as building the engine (loading a model or an index)."""
    import medrwr.retrieval.open as opener
    from medrwr.rollout import engine

    def boom(*a, **kw):
        raise AssertionError("ask loaded a model or an index before checking its input")

    monkeypatch.setattr(engine, "engine_from_config", boom)
    monkeypatch.setattr(opener, "open_retriever", boom)


@pytest.fixture
def no_index(monkeypatch):
    import medrwr.retrieval.open as opener

    def boom(*a, **kw):
        raise AssertionError("retrieve opened an index before checking its input")

    monkeypatch.setattr(opener, "open_retriever", boom)


# ------------------------------------------------------------------------------------------ item 3


@pytest.mark.parametrize(
    "args,words",
    [
        (["retrieve", ""], ["queries[0] is empty"]),
        (["retrieve", "   "], ["queries[0] is empty"]),
        (["retrieve", "ok", "\t"], ["queries[1] is empty"]),
        (["retrieve", "x", "-k", "100000"], ["k must be", "100", "100000"]),
        (["retrieve", "x", "-k", "0"], ["k must be"]),
        (["retrieve", "x" * 100_000], ["100000 characters", "4096"]),
        (["retrieve", *["q"] * 300], ["too many queries", "256"]),
    ],
)
def test_retrieve_refuses_nonsense_before_opening_an_index(args, words, no_index, capsys):
    _one_line_error(capsys, main(args), 2, *words)


def test_retrieve_truncates_a_long_query_in_the_table_title(index_dir, capsys):
    query = "pleural " * 400  # 3,200 characters: allowed, but not a 40-line title
    assert main(["retrieve", query, "--index", str(index_dir), "--mode", "bm25"]) == 0
    out = capsys.readouterr().out
    assert f"({len(query)} characters)" in out and query.strip() not in out
    assert len(out.splitlines()) < 30


def test_one_set_of_limits_for_library_and_server():
    from medrwr.config import ServerConfig
    from medrwr.retrieval.base import FakeRetriever
    from medrwr.retrieval.service.errors import APIError
    from medrwr.retrieval.service.requests import check_k, check_queries

    cfg = ServerConfig()
    assert (cfg.max_query_chars, cfg.max_k, cfg.max_queries_per_request) == (
        limits.MAX_QUERY_CHARS, limits.MAX_K, limits.MAX_QUERIES)
    retriever = FakeRetriever({"a": "alpha"})
    for queries, code in ((["  "], "empty_query"), (["x" * (limits.MAX_QUERY_CHARS + 1)], "query_too_long")):
        with pytest.raises(InputError) as lib:
            retriever.search(queries, k=1)
        assert isinstance(lib.value, ValueError) and lib.value.code == code
        with pytest.raises(APIError) as srv:
            check_queries(queries, cfg)
        assert srv.value.status == 400 and srv.value.code == code and str(lib.value) in srv.value.message
    with pytest.raises(InputTypeError):
        retriever.search("a bare string", k=1)
    with pytest.raises(APIError, match="k must be between 1 and 100"):
        check_k(101, cfg)
    assert retriever.search([], k=1) == []


@pytest.mark.parametrize(
    "args,code,words",
    [
        (["ask", ""], 2, ["question is empty"]),
        (["ask", "   \n "], 2, ["question is empty"]),
        (["ask", "q" * 100_000], 2, ["100000 characters", str(limits.MAX_QUESTION_CHARS)]),
        (["ask", "Which?", "--option", "ok", "--option", "  "], 2, ["option 2 is empty"]),
        (["ask", "Which?", *[a for i in range(11) for a in ("--option", f"o{i}")]], 2, ["at most 10"]),
    ],
)
def test_ask_refuses_bad_questions_before_any_model_loads(args, code, words, no_model, capsys):
    t0 = time.perf_counter()
    _one_line_error(capsys, main(args), code, *words)
    assert time.perf_counter() - t0 < 3


def test_ask_checks_images_index_and_server_before_any_model_loads(index_dir, tmp_path, no_model, capsys):
    not_png = tmp_path / "scan.png"
    not_png.write_text("this is text, not an image")
    cases = [
        (["--image", str(tmp_path / "missing.png")], ["--image", "does not exist"]),
        (["--image", str(not_png)], ["--image", "scan.png", "cannot identify image"]),
        (["--index", "/nonexistent/ix"], ["/nonexistent/ix does not exist", "medrwr index build"]),
        (["--index", str(tmp_path)], ["no manifest.json"]),
        (["--set", "retrieval.url=http://127.0.0.1:9"], ["http://127.0.0.1:9", "`medrwr serve retrieval`"]),
        (["--cdir", "--image-index", str(tmp_path / "no-images")], ["no-images does not exist"]),
    ]
    for extra, words in cases:
        t0 = time.perf_counter()
        _one_line_error(capsys, main(["ask", "Which finding?", "--index", str(index_dir), *extra]), 1, *words)
        assert time.perf_counter() - t0 < 3, extra


# ------------------------------------------------------------------------------------------ item 5


def _build(corpus: Path, out: Path, *flags: str) -> int:
    return main(["index", "build", "--corpus", str(corpus), "--out", str(out), "--set", "retrieval.dense=false",
                 *flags])


def test_corpus_errors_name_file_line_and_reason(tmp_path, capsys):
    binary = tmp_path / "model.jsonl"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    _one_line_error(capsys, _build(binary, tmp_path / "o"), 1, "model.jsonl:1:", "not UTF-8")

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"id": "1", "text": "ok"}\n{"id": "2", "text": "caf\xe9"}\n')
    _one_line_error(capsys, _build(latin, tmp_path / "o"), 1, "latin.jsonl:2:", "not UTF-8", "0xe9", "iconv")

    zipped = tmp_path / "corpus.jsonl"
    zipped.write_bytes(gzip.compress(b'{"id": "1", "text": "x"}\n'))
    _one_line_error(capsys, _build(zipped, tmp_path / "o"), 1, "corpus.jsonl:1:", "gzip", ".gz")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "text": "fine"}\n{"id": "2" "text": "no comma between the fields here"}\n')
    _one_line_error(capsys, _build(bad, tmp_path / "o"), 1, "bad.jsonl:2:", "Expecting ',' delimiter",
                    "column 12", '"text": "no comma')


def test_csv_with_an_unclosed_quote_is_an_error_unless_allowed(tmp_path, capsys):
    p = tmp_path / "notes.csv"
    p.write_text('id,text\n1,"an unclosed quote\n2,second row\n3,third row\n')
    _one_line_error(capsys, _build(p, tmp_path / "o"), 1, "notes.csv:2:", "lines 2-4", "--allow-multiline-csv")
    assert not (tmp_path / "o").exists()
    assert _build(p, tmp_path / "o", "--allow-multiline-csv") == 0
    assert "1 documents" in " ".join(capsys.readouterr().out.split())


def test_column_flags_map_a_custom_layout(tmp_path, capsys):
    p = tmp_path / "abstracts.csv"
    p.write_text("pmid,heading,abstract\n9,Gout,Urate crystals in the joint.\n10,Asthma,Reversible airway narrowing.\n")
    _one_line_error(capsys, _build(p, tmp_path / "o"), 1, "cannot detect the corpus layout", "--text-column")
    out = tmp_path / "ix"
    assert _build(p, out, "--text-column", "abstract", "--title-column", "heading", "--id-column", "pmid") == 0
    capsys.readouterr()
    assert main(["retrieve", "urate", "--index", str(out), "--json", "-k", "1"]) == 0
    hit = json.loads(capsys.readouterr().out)["results"][0]["hits"][0]
    assert (hit["doc_id"], hit["title"], hit["text"]) == ("9", "Gout", "Urate crystals in the joint.")
    _one_line_error(capsys, _build(p, tmp_path / "o", "--text-column", "body"), 1,
                    "text column 'body' (--text-column) is not in the corpus", "abstract")
    _one_line_error(capsys, main(["index", "build", "--corpus", "default", "--out", str(tmp_path / "d"),
                                  "--text-column", "x"]), 1, "--corpus default")


# ------------------------------------------------------------------------------------------ item 6


def test_corrupt_default_kb_advice_fits_the_default_kb(tmp_path, monkeypatch, capsys):
    import medrwr.kb.default as kb
    from medrwr.retrieval.index.corpus import Document
    from medrwr.retrieval.index.hybrid import build_index
    from medrwr.retrieval.index.store import load_manifest

    out = build_index([Document(i, t, x) for i, t, x in DOCS], tmp_path / "default-kb", dense=False,
                      show_progress=False, extra_manifest={"kb_version": "default-kb-test"})
    docs = out / "docs.jsonl"
    docs.write_bytes(docs.read_bytes().replace(b"enlarged", b"ENLARGED"))
    with pytest.raises(IndexCorrupt, match="--corpus default"):
        load_manifest(out)
    monkeypatch.setattr(kb, "ensure_default_index", lambda *a, **kw: out)
    err = _one_line_error(capsys, main(["retrieve", "heart"]), 1, "checksum error",
                          f"medrwr index build --corpus default --out {out}", f"delete {out}")
    assert "--corpus PATH" not in err


def test_index_info_shows_a_changed_index_with_a_warning(index_dir, tmp_path, capsys):
    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(index_dir, changed)
    docs = changed / "docs.jsonl"
    docs.write_bytes(docs.read_bytes().replace(b"enlarged", b"ENLARGED"))
    code = main(["index", "info", str(changed)])
    out = capsys.readouterr()
    assert code == 1 and "Traceback" not in out.err
    table = " ".join(out.out.replace("│", " ").split())
    assert "documents 3" in table and "checksums FAILED" in table
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and "the index is damaged" in err and "docs.jsonl" in err
    assert main(["index", "info", str(changed), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["doc_count"] == 3


# ------------------------------------------------------------------------------------------ item 7


def test_help_shows_defaults(capsys):
    assert main(["retrieve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "(default: retrieval.k, 3)" in text and "1 to 100" in text
    assert main(["index", "build", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    for flag in ("--text-column", "--title-column", "--id-column", "--allow-multiline-csv", "[default: auto]"):
        assert flag in text
