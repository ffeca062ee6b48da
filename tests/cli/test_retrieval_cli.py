"""`medrwr index build`, `medrwr index info`, `medrwr retrieve`: return codes, tables, JSON, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medrwr.cli import main

CORPUS = [
    {"id": "hpo-1", "title": "Wheezing", "content": "A high-pitched whistling sound during breathing."},
    {"id": "hpo-2", "title": "Hemoptysis", "content": "Coughing up of blood from the respiratory tract."},
    {"id": "icd-I21", "title": "Acute myocardial infarction", "content": "Heart attack with ST elevation."},
    {"id": "icd-K35", "title": "Acute appendicitis", "content": "Inflammation of the vermiform appendix."},
]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cli") / "mini.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in CORPUS), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def sparse_index(corpus_file) -> Path:
    out = corpus_file.parent / "sparse-ix"
    assert (
        main(
            [
                "index",
                "build",
                "--corpus",
                str(corpus_file),
                "--out",
                str(out),
                "--set",
                "retrieval.dense=false",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def dense_index(corpus_file) -> Path:
    out = corpus_file.parent / "dense-ix"
    assert (
        main(
            [
                "index",
                "build",
                "--corpus",
                str(corpus_file),
                "--out",
                str(out),
                "--preset",
                "medrag",
                "--set",
                "retrieval.device=cpu",
            ]
        )
        == 0
    )
    return out


def test_build_prints_summary(corpus_file, tmp_path, capsys):
    out = tmp_path / "ix"
    assert (
        main(
            [
                "index",
                "build",
                "--corpus",
                str(corpus_file),
                "--out",
                str(out),
                "--set",
                "retrieval.dense=false",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "built" in text and "4 documents" in text and "bm25" in text
    assert (out / "manifest.json").is_file()


def test_info_table_and_json(sparse_index, capsys):
    assert main(["index", "info", str(sparse_index)]) == 0
    out = capsys.readouterr().out
    assert "documents" in out and "4" in out and "BM25 only" in out and "mini: 4" in out
    assert main(["index", "info", str(sparse_index), "--json", "--verify"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["doc_count"] == 4 and m["format_version"] == 1


def test_retrieve_json_bm25(sparse_index, capsys):
    code = main(
        [
            "retrieve",
            "coughing blood",
            "whistling",
            "--index",
            str(sparse_index),
            "--mode",
            "bm25",
            "-k",
            "2",
            "--json",
        ]
    )
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["mode"] == "bm25" and payload["k"] == 2
    assert [r["query"] for r in payload["results"]] == ["coughing blood", "whistling"]
    assert payload["results"][0]["hits"][0]["doc_id"] == "hpo-2"
    assert payload["results"][1]["hits"][0]["title"] == "Wheezing"
    assert payload["results"][0]["hits"][0]["source"] == "mini"


def test_retrieve_table_hybrid(dense_index, capsys):
    assert main(["retrieve", "heart attack", "--index", str(dense_index), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "myocardial" in out and "infarction" in out and "hybrid" in out and "score" in out
    first_row = next(line for line in out.splitlines() if line.startswith("│ 1 │"))
    assert "Heart attack with ST elevation" in first_row and "mini" in first_row  # text snippet + source


def test_retrieve_dense_json(dense_index, capsys):
    assert (
        main(["retrieve", "swollen appendix", "--index", str(dense_index), "--mode", "dense", "--json"]) == 0
    )
    hits = json.loads(capsys.readouterr().out)["results"][0]["hits"]
    assert hits[0]["doc_id"] == "icd-K35" and len(hits) == 3  # default k from config


def test_retrieve_uses_default_kb_when_no_index(sparse_index, monkeypatch, capsys):
    from medrwr.kb import default as kb

    monkeypatch.setattr(kb, "ensure_default_index", lambda *a, **kw: sparse_index)
    assert main(["retrieve", "appendix", "--mode", "bm25", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["index"] == str(sparse_index)


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())  # rich wraps long messages


def test_errors_exit_1_with_a_clear_message(sparse_index, tmp_path, capsys):
    assert main(["retrieve", "x", "--index", str(tmp_path / "nope")]) == 1
    assert "does not exist" in _err(capsys)
    assert main(["retrieve", "x", "--index", str(sparse_index), "--mode", "fuzzy"]) == 1
    assert "unknown mode 'fuzzy'" in _err(capsys)
    assert main(["retrieve", "x", "--index", str(sparse_index), "--mode", "dense"]) == 1
    assert "built without them" in _err(capsys)
    assert main(["index", "info", str(tmp_path)]) == 1
    assert "no manifest.json" in _err(capsys)
    assert (
        main(["index", "build", "--corpus", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
        == 1
    )
    assert "does not exist" in _err(capsys)
    assert (
        main(
            [
                "index",
                "build",
                "--corpus",
                str(sparse_index / "docs.jsonl"),
                "--out",
                str(tmp_path / "o"),
                "--set",
                "retrieval.nope=1",
            ]
        )
        == 1
    )
    assert "unknown key 'retrieval.nope'" in _err(capsys)


def test_corrupt_index_is_reported(corpus_file, tmp_path, capsys):
    out = tmp_path / "ix"
    assert (
        main(
            [
                "index",
                "build",
                "--corpus",
                str(corpus_file),
                "--out",
                str(out),
                "--set",
                "retrieval.dense=false",
            ]
        )
        == 0
    )
    docs = out / "docs.jsonl"
    docs.write_bytes(docs.read_bytes().replace(b"Wheezing", b"Sneezing"))
    capsys.readouterr()
    assert main(["retrieve", "wheeze", "--index", str(out)]) == 1
    err = _err(capsys)
    assert "checksum error" in err and "docs.jsonl" in err
    assert main(["index", "info", str(out)]) == 1
