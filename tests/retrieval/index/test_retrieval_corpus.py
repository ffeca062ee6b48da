"""Corpus ingestion: each preset and file format, streaming, bad rows, chunking."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from medrwr.errors import CorpusError
from medrwr.retrieval.index.corpus import (
    PRESETS,
    ColumnMapping,
    Document,
    chunk_documents,
    detect_preset,
    read_corpus,
)


def _write_jsonl(path: Path, records: list[dict], gz: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def _write_delimited(
    path: Path, header: list[str], rows: list[list[str]], delimiter: str, gz: bool = False
) -> Path:
    opener = (
        (lambda: gzip.open(path, "wt", encoding="utf-8", newline=""))
        if gz
        else (lambda: open(path, "w", encoding="utf-8", newline=""))
    )
    with opener() as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


MEDRAG = [
    {
        "id": "pubmed23n0001_0",
        "title": "Asthma",
        "content": "Asthma is a chronic airway disease.",
        "contents": "Asthma. Asthma is a chronic airway disease.",
        "PMID": 17,
    },
    {
        "id": "pubmed23n0001_1",
        "title": "Gout",
        "content": "Gout is caused by urate crystals.",
        "contents": "Gout. Gout is caused by urate crystals.",
        "PMID": 18,
    },
]


def test_medrag_jsonl_preset_and_auto(tmp_path):
    p = _write_jsonl(tmp_path / "pubmed.jsonl", MEDRAG)
    for preset in ("auto", "medrag"):
        docs = list(read_corpus(p, preset=preset))
        assert [d.doc_id for d in docs] == ["pubmed23n0001_0", "pubmed23n0001_1"]
        assert docs[0].title == "Asthma" and docs[0].text == "Asthma is a chronic airway disease."
        assert docs[0].source == "pubmed"  # file name without extension
        assert docs[0].metadata == {"PMID": 17}  # content/contents/title/id are not metadata


def test_medrwr_tsv_preset(tmp_path):
    p = _write_delimited(
        tmp_path / "knowledge_base.tsv",
        ["id", "text"],
        [
            ["kb-1", "Pneumothorax shows absent lung markings."],
            ["kb-2", "Cardiomegaly: heart width > half chest."],
        ],
        "\t",
    )
    assert detect_preset(["id", "text"]) == "medrwr"
    docs = list(read_corpus(p, preset="medrwr", source="ExpKB"))
    assert [(d.doc_id, d.title, d.source) for d in docs] == [("kb-1", "", "ExpKB"), ("kb-2", "", "ExpKB")]
    assert docs[1].text == "Cardiomegaly: heart width > half chest."
    # the same KB with a 'contents' column instead of 'text'
    p2 = _write_delimited(tmp_path / "kb2.tsv", ["id", "contents"], [["a", "Rib fracture."]], "\t")
    assert next(read_corpus(p2, preset="medrwr")).text == "Rib fracture."


def test_flashrag_preset_splits_title(tmp_path):
    recs = [{"id": "0", "contents": '"Aaron"\nAaron is a prophet.'}, {"id": "1", "contents": "No title line"}]
    p = _write_jsonl(tmp_path / "wiki.jsonl", recs)
    assert detect_preset(recs[0].keys()) == "flashrag"
    docs = list(read_corpus(p))
    assert (docs[0].title, docs[0].text) == ("Aaron", "Aaron is a prophet.")
    assert (docs[1].title, docs[1].text) == ("", "No title line")


def test_plain_csv_with_quotes_and_huge_field(tmp_path):
    huge = "word " * 60_000  # 300 kB: above csv's default 128 kB field limit
    p = _write_delimited(
        tmp_path / "plain.csv",
        ["id", "title", "text", "year"],
        [["d1", "Sepsis, severe", 'Fever, "rigors", hypotension', "2020"], ["d2", "Long", huge, "2021"]],
        ",",
    )
    docs = list(read_corpus(p, preset="plain"))
    assert docs[0].title == "Sepsis, severe" and docs[0].text == 'Fever, "rigors", hypotension'
    assert docs[0].metadata == {"year": "2020"}
    assert len(docs[1].text) == len(huge.strip())


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    n = 10_000
    table = pa.table(
        {"id": [f"p{i}" for i in range(n)], "title": ["t"] * n, "text": [f"text {i}" for i in range(n)]}
    )
    path = tmp_path / "c.parquet"
    pq.write_table(table, path, row_group_size=1000)
    it = read_corpus(path)
    first = next(it)
    assert (first.doc_id, first.text) == ("p0", "text 0")
    rest = list(it)
    assert len(rest) == n - 1 and rest[-1].doc_id == f"p{n - 1}"


def test_gzip_jsonl_and_tsv(tmp_path):
    p = _write_jsonl(tmp_path / "textbooks.jsonl.gz", MEDRAG, gz=True)
    docs = list(read_corpus(p))
    assert [d.doc_id for d in docs] == ["pubmed23n0001_0", "pubmed23n0001_1"] and docs[
        0
    ].source == "textbooks"
    p2 = _write_delimited(tmp_path / "kb.tsv.gz", ["id", "text"], [["x", "Edema."]], "\t", gz=True)
    assert [(d.doc_id, d.text) for d in read_corpus(p2)] == [("x", "Edema.")]


def test_missing_id_column_gives_stable_row_ids(tmp_path):
    p = _write_jsonl(
        tmp_path / "noid.jsonl", [{"title": "A", "text": "alpha"}, {"title": "B", "text": "beta"}]
    )
    first = [d.doc_id for d in read_corpus(p)]
    assert first == ["0", "1"] and [d.doc_id for d in read_corpus(p)] == first


def test_reading_is_lazy(tmp_path):
    """A bad record near the end is not touched when only the first document is consumed."""
    lines = [json.dumps({"id": str(i), "text": f"doc {i}"}) for i in range(2000)] + ["{not json"]
    p = tmp_path / "big.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    it = read_corpus(p)
    assert next(it).doc_id == "0"  # no error yet: the file is read line by line
    with pytest.raises(CorpusError, match=r"big\.jsonl:2001: not valid JSON"):
        list(it)
    tsv = _write_delimited(tmp_path / "lazy.tsv", ["id", "text"], [[str(i), "t"] for i in range(500)], "\t")
    with open(tsv, "a", encoding="utf-8") as f:
        f.write("only-one-field\n")
    it = read_corpus(tsv)
    assert next(it).doc_id == "0"
    with pytest.raises(CorpusError, match=r"lazy\.tsv:502: row has 1 fields but the header has 2"):
        list(it)


def test_bad_input_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(CorpusError, match="unknown corpus format"):
        read_corpus(tmp_path / "x.txt")
    p = _write_jsonl(tmp_path / "weird.jsonl", [{"id": "1", "body": "x"}])
    with pytest.raises(CorpusError, match=r"weird\.jsonl:1: cannot detect the corpus layout"):
        list(read_corpus(p))
    with pytest.raises(CorpusError, match=r"no text column: looked for \['content', 'contents'\]"):
        list(read_corpus(p, preset="medrag"))
    with pytest.raises(CorpusError, match="unknown corpus preset"):
        read_corpus(p, preset="nope")
    arr = tmp_path / "arr.json"
    arr.write_text('[{"id": 1, "text": "x"}]')
    with pytest.raises(CorpusError, match="JSON Lines"):
        list(read_corpus(arr))


def test_custom_column_mapping(tmp_path):
    p = _write_jsonl(
        tmp_path / "c.jsonl", [{"pmid": "9", "heading": "H", "abstract": "A b c", "journal": "J"}]
    )
    m = ColumnMapping(id=("pmid",), text=("abstract",), title="heading", source="journal", metadata=())
    d = next(read_corpus(p, columns=m))
    assert d == Document("9", "H", "A b c", "J", {})
    assert set(PRESETS) == {"medrag", "medrwr", "flashrag", "plain"}


def test_chunk_words_with_overlap():
    doc = Document("d", "T", " ".join(f"w{i}" for i in range(10)), "s", {"k": 1})
    chunks = list(chunk_documents([doc], size=4, overlap=1))
    assert [c.doc_id for c in chunks] == ["d#0", "d#1", "d#2"]
    assert [c.text.split() for c in chunks] == [
        ["w0", "w1", "w2", "w3"],
        ["w3", "w4", "w5", "w6"],
        ["w6", "w7", "w8", "w9"],
    ]
    assert all(c.title == "T" and c.source == "s" and c.metadata["parent_id"] == "d" for c in chunks)
    assert [c.metadata["chunk"] for c in chunks] == [0, 1, 2] and chunks[0].metadata["k"] == 1
    # every word is covered, consecutive chunks share exactly `overlap` words
    assert list(chunk_documents([doc], size=0)) == [doc]
    short = list(chunk_documents([Document("s", "", "a b", "")], size=5))
    assert [(c.doc_id, c.text) for c in short] == [("s#0", "a b")]
    with pytest.raises(ValueError, match="overlap"):
        list(chunk_documents([doc], size=4, overlap=4))


def test_chunk_tokens_with_a_real_tokenizer():
    from transformers import AutoTokenizer

    from medrwr.assets import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    text = "Pulmonary embolism presents with sudden dyspnea, pleuritic chest pain and tachycardia in adults."
    doc = Document("pe", "PE", text, "")
    ids = tok.encode(text, add_special_tokens=False)
    chunks = list(chunk_documents([doc], size=6, overlap=2, unit="tokens", tokenizer=tok))
    assert len(chunks) == -(-(len(ids) - 2) // 4)
    # chunk i holds token window [4i, 4i + 6): consecutive chunks share 2 tokens
    assert [c.text for c in chunks] == [
        tok.decode(ids[4 * i : 4 * i + 6]).strip() for i in range(len(chunks))
    ]
    assert chunks[0].text.startswith("pulmonary embolism")  # uncased tokenizer lower-cases
    with pytest.raises(ValueError, match="needs a tokenizer"):
        list(chunk_documents([doc], size=6, unit="tokens"))
