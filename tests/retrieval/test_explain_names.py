"""Exact-name and name-BM25 rankings in hybrid fusion, ``HybridRetriever.explain`` and ``retrieve --explain``.

A small real index (packaged MiniLM, real BM25 and FAISS) whose documents list their names, as the
default KB's concept passages do.
"""

from __future__ import annotations

import json

import pytest

from medrwr.config import RetrievalConfig
from medrwr.retrieval.index.corpus import Document
from medrwr.retrieval.index.hybrid import NAMES_FILE, HybridRetriever, build_index, name_norm

DOCS = [
    Document("HP:1", "Goiter", "Goiter. An enlargement of the thyroid gland. Also called: Enlarged thyroid gland in neck.",
             "HPO", {"names": ["Goiter", "Enlarged thyroid gland in neck", "Goitre"]}),
    Document("HP:2", "Abnormal thyroid morphology", "Any structural anomaly of the thyroid gland. The thyroid gland, "
             "thyroid gland size and thyroid gland shape are abnormal.", "HPO",
             {"names": ["Abnormal thyroid morphology"]}),
    Document("HP:3", "Bradycardia", "A slower than normal heart rate. Also called: slow heartbeats.", "HPO",
             {"names": ["Bradycardia", "Slow heartbeats"]}),
    Document("D:1", "Sinus bradycardia with bradycardia", "Bradycardia bradycardia of sinus origin; bradycardia.",
             "MeSH", {"names": ["Sinus bradycardia"]}),
    Document("X:1", "Heart rate", "The number of heart beats per minute.", "other"),
]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from medrwr.retrieval.encoders.text import load_text_encoder

    out = tmp_path_factory.mktemp("names") / "idx"
    cfg = RetrievalConfig(device="cpu", rrf_k=5, dense_weight=0.5, name_weight=4.0, name_bm25_weight=1.0)
    return build_index(DOCS, out, cfg, encoder=load_text_encoder("default", device="cpu"), show_progress=False)


def test_names_feed_a_table_and_are_not_stored_per_document(index):
    r = HybridRetriever.load(index)
    assert (index / NAMES_FILE).is_file()
    assert "names" not in r.docs.get(0).metadata
    assert r.name_matches("goitre") == [0] and r.name_matches("GOITER") == [0]
    assert r.name_matches("thyroid") == []  # exact names only
    assert name_norm("Gland, thyroid") == name_norm("thyroid gland")


def test_an_exact_name_wins_hybrid_even_where_bm25_prefers_another_passage(index):
    r = HybridRetriever.load(index)
    assert r.search(["bradycardia"], k=1, mode="bm25")[0][0].doc_id == "D:1"  # tf-heavy passage
    assert r.search(["bradycardia"], k=1, mode="hybrid")[0][0].doc_id == "HP:3"
    # a lay name that is not exact: the BM25 over names finds it
    assert r.search(["enlarged thyroid gland"], k=1, mode="hybrid")[0][0].doc_id == "HP:1"


def test_explain_gives_each_parts_rank_and_score(index):
    r = HybridRetriever.load(index)
    hits = r.search(["bradycardia"], k=3)[0]
    why = r.explain(["bradycardia"], k=3)[0]
    assert [e["doc_id"] for e in why] == [h.doc_id for h in hits]
    top = why[0]
    assert top["name_match"] is True and top["name_bm25_rank"] in (1, 2)
    assert top["bm25"]["rank"] == 2 and top["bm25"]["score"] > 0 and top["dense"]["rank"] >= 1
    assert top["fused_score"] == pytest.approx(hits[0].score)
    # the fused score is the weighted RRF of the parts' ranks
    c = r.config
    expect = sum(w / (c.rrf_k + rank) for w, rank in ((c.bm25_weight, top["bm25"]["rank"]),
                                                       (c.dense_weight, top["dense"]["rank"]),
                                                       (c.name_weight, 1), (c.name_bm25_weight, top["name_bm25_rank"])))
    assert top["fused_score"] == pytest.approx(expect)
    bm25_only = r.explain(["heart beats"], k=2, mode="bm25")[0]
    assert bm25_only[0]["fused_score"] is None and bm25_only[0]["dense"] is None


def test_cli_retrieve_explain(index, capsys):
    from medrwr.cli import main

    assert main(["retrieve", "bradycardia", "--index", str(index), "-k", "2", "--explain", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    e = out["results"][0]["hits"][0]["explain"]
    assert e["name_match"] is True and e["bm25"]["rank"] == 2 and e["fused_score"] > 0
    assert main(["retrieve", "bradycardia", "--index", str(index), "-k", "2", "--explain"]) == 0
    table = capsys.readouterr().out
    assert "bm25" in table and "clin" in table and "exact" in table and "#2" in table


CLINICAL = [
    Document("HP:9", "Barking cough", "Barking cough (phenotype). A cough that sounds like a barking seal; barking cough.",
             "HPO", {"names": ["Barking cough"]}),
    Document("HP:8", "Stridor", "Stridor (phenotype). A harsh sound on breathing in; stridor.", "HPO",
             {"names": ["Stridor"]}),
    Document("M:1", "Croup", "Croup (disease). Laryngotracheobronchitis. Clinical presentation: a viral infection of "
             "young children with a barking cough, hoarse voice and inspiratory stridor, worse at night.", "MeSH",
             {"names": ["Croup"], "clinical": "A viral infection of young children with a barking cough, hoarse voice "
                                              "and inspiratory stridor, worse at night."}),
    Document("X:2", "Cough", "Cough (phenotype). A sudden expulsion of air; cough.", "HPO", {"names": ["Cough"]}),
]


def test_clinical_text_is_ranked_alone_and_pulls_the_disease_up(tmp_path):
    """``metadata["clinical"]`` gets its own BM25 (not stored per document); ``clinical_weight`` fuses it in, so a
    description of a patient reaches the disease whose presentation it resembles; explain shows its rank."""
    from medrwr.retrieval.encoders.text import load_text_encoder
    from medrwr.retrieval.index.hybrid import CLINICAL_BM25_DIR

    cfg = RetrievalConfig(device="cpu", rrf_k=5, dense_weight=0.5, name_weight=4.0, name_bm25_weight=1.0)
    path = build_index(CLINICAL, tmp_path / "idx", cfg, encoder=load_text_encoder("default", device="cpu"),
                       show_progress=False)
    assert (path / CLINICAL_BM25_DIR).is_dir()
    q = ["child with barking cough and stridor at night"]
    off = HybridRetriever.load(path)
    assert "clinical" not in off.docs.get(2).metadata and off.config.clinical_weight == 0
    assert off.explain(q, k=4)[0][0]["clinical_rank"] is None  # weight 0: the ranking is not even computed
    on = HybridRetriever.load(path, config=RetrievalConfig(**{**cfg.settings(), "clinical_weight": 2.0}))
    top = on.explain(q, k=4)[0]
    assert top[0]["doc_id"] == "M:1" and top[0]["clinical_rank"] == 1
    assert [e["clinical_rank"] for e in top[1:]] == [None] * 3  # only documents with clinical text rank there
    ranks_off = [h.doc_id for h in off.search(q, k=4)[0]]
    assert ranks_off.index("M:1") > 0  # without it the phenotype names win


def test_names_are_embedded_one_by_one_and_rank_by_the_closest_name(index):
    """``names_dense.faiss`` holds one vector per distinct name (case-folded, per document); with
    ``name_dense_weight`` the closest name ranks its document, so a paraphrase sharing no word with a passage's
    names still reaches it."""
    import numpy as np

    from medrwr.retrieval.index.hybrid import NAMES_DENSE_FILE, NAMES_DENSE_ROWS, _name_dense_ranking

    rows = np.load(index / NAMES_DENSE_ROWS)
    assert rows.tolist() == [0, 0, 0, 1, 2, 2, 3]  # X:1 lists no names; "Goiter"/"Goitre" both kept
    assert (index / NAMES_DENSE_FILE).is_file()
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["names_dense"]["names"] == 7
    off = HybridRetriever.load(index)
    assert off.config.name_dense_weight == 0 and off.explain(["heart"], k=1)[0][0]["name_dense_rank"] is None
    on = HybridRetriever.load(index, config=RetrievalConfig(**{**off.config.settings(), "name_dense_weight": 1.0}))
    why = on.explain(["my heart is beating very slowly"], k=5)[0]
    by_id = {e["doc_id"]: e["name_dense_rank"] for e in why}
    assert by_id["HP:3"] == 1 and by_id.get("X:1") is None
    # the ranking itself: first occurrence of each row, at most `depth` rows
    import faiss

    vecs = np.asarray([[1, 0.5, 0]], dtype=np.float32)
    flat = faiss.IndexFlatIP(3)
    flat.add(np.asarray([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32))
    assert _name_dense_ranking(flat, np.asarray([7, 7, 8, 9]), vecs, depth=2) == [[7, 8]]
