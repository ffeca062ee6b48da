"""Concept-level passages: one passage per medical concept, merging what every source knows about it.

Why: a per-source KB answers ``goiter`` with three thin passages of one concept (HPO, MeSH, ICD-10-CM),
wasting the top-k, while the definition and lay synonyms sit only in the HPO one. Here concepts of
different sources are linked into one group when their normalised names agree (:func:`link_key`: case,
word order, plural and "unspecified"/"NOS" insensitive): a name equal to a name, or a name equal to an
exact synonym (HPO exact synonyms, MeSH name variants) when that synonym names one concept only. The
installed HPO release carries UMLS/SNOMED xrefs but no MeSH ones, and the MeSH package carries no UMLS
ids, so names are the shared key. A group holds at most one concept per source (a link that would put
two HPO terms together is skipped), drug names never merge with disease sources, and every source
concept lands in exactly one group, so each stays reachable. The passage's id is its first concept's
(HPO, MeSH, OMIM, Orphanet, DECIPHER, ICD-10-CM, drugs, in that order); ``metadata["source_ids"]``
lists every merged concept for attribution.

HPO's disease annotations (:mod:`medrwr.vocab.hpoa`) add disease concepts ("X presents with ...",
linked to MeSH / ICD-10-CM by name too) and the reverse side on phenotypes ("a feature of ..."); common
conditions get their classic clinical presentation (:mod:`medrwr.vocab.presentations`) after the definitions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from medrwr.vocab.concepts import SOURCES, Concept
from medrwr.vocab.hpoa import Disease, frequency_label, hpo_diseases
from medrwr.vocab.passages import dedupe_names, name_key
from medrwr.vocab.presentations import SOURCE as PRESENTATION_SOURCE
from medrwr.vocab.presentations import presentations
from medrwr.vocab.sources import concepts

DISEASE_SOURCE = "HPO-diseases"
"""The source label of HPO-annotated diseases (ids ``OMIM:``, ``ORPHA:``, ``DECIPHER:``)."""
_ORDER = ("HPO", "MeSH", "OMIM", "ORPHA", "DECIPHER", "ICD-10-CM", "drug-NER")
_KIND = {"HPO": "phenotype", "MeSH": "disease", "OMIM": "disease", "ORPHA": "disease", "DECIPHER": "disease",
         "ICD-10-CM": "diagnosis", "drug-NER": "drug"}
_FILLER = frozenset({"unspecified", "nos"})
_MAX_WORDS = 380
_MAX_FEATURES = 30
_MAX_DISEASES = 8


@dataclass(frozen=True)
class ConceptPassage:
    """One merged passage: ``id`` of its first concept, ``source`` like ``HPO+MeSH``, ``metadata["source_ids"]``."""

    id: str
    title: str
    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


def link_key(name: str) -> tuple[str, ...]:
    """The key two sources' names must share to be linked.

    >>> link_key("Bradycardia, unspecified") == link_key("bradycardia")
    True
    """
    return tuple(w for w in name_key(name) if w not in _FILLER)


def _slot(c: Concept) -> str:
    """The source slot of a concept: its source, or the id prefix for annotated diseases."""
    return c.id.split(":", 1)[0] if c.source == DISEASE_SOURCE else c.source


def disease_concepts() -> tuple[Concept, ...]:
    """HPO-annotated diseases as :class:`Concept` (no synonyms; phenotypes live in :mod:`medrwr.vocab.hpoa`)."""
    return tuple(Concept(id=d.id, name=d.name, source=DISEASE_SOURCE, key=d.id) for d in hpo_diseases())


class _Groups:
    """Union-find over concept indices that keeps at most one concept per source slot in a group."""

    def __init__(self, slots: list[str]):
        self.parent = list(range(len(slots)))
        self.slots = [{s} for s in slots]

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb or self.slots[ra] & self.slots[rb]:
            return False
        if ra > rb:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.slots[ra] |= self.slots[rb]
        return True


def _groups(items: list[Concept], held: dict[str, set[tuple]]) -> list[list[int]]:
    slots = [_slot(c) for c in items]
    uf = _Groups(slots)
    by_name: dict[tuple, list[int]] = {}
    by_syn: dict[tuple, list[int]] = {}
    for i, c in enumerate(items):
        if slots[i] == "drug-NER":
            continue
        k = link_key(c.name)
        if k:
            by_name.setdefault(k, []).append(i)
        if slots[i] in ("HPO", "MeSH"):
            for s in sorted({link_key(s.text) for s in c.exact_synonyms} - {k} - held.get(c.id, set())):  # sorted: hash-seed-free
                if s:
                    by_syn.setdefault(s, []).append(i)
    for idx in by_name.values():  # pass 1: equal names (order: HPO, MeSH, diseases, ICD as read)
        for j in idx[1:]:
            uf.union(idx[0], j)
    for k, idx in by_syn.items():  # pass 2: a name equal to another source's exact synonym, if unambiguous
        named = by_name.get(k, [])
        per_slot = Counter(slots[i] for i in idx)
        for j in named:
            for i in idx:
                if per_slot[slots[i]] == 1 and slots[i] != slots[j]:
                    uf.union(i, j)
    out: dict[int, list[int]] = {}
    for i in range(len(items)):
        out.setdefault(uf.find(i), []).append(i)
    return [sorted(g, key=lambda i: (_ORDER.index(slots[i]), i)) for g in out.values()]


def _words(text: str, n: int) -> str:
    w = text.split()
    return text if len(w) <= n else " ".join(w[:n]) + " ..."


def _join(label: str, items: Sequence[str]) -> str:
    return f"{label}: {'; '.join(items)}." if items else ""


def _icd_block(c: Concept, dropped: set[tuple]) -> str:
    inclusion = [s for s in c.synonym_texts if name_key(s) not in dropped]
    parts = [f"ICD-10-CM {c.key}: {c.name}."]
    if c.parents:
        parts.append(f"Category: {c.parents[0]}.")
    parts.append(_join("Includes", dedupe_names(inclusion, exclude=[c.name])))
    notes = " ".join(n for n in c.notes if n)
    if notes:
        parts.append(_words(notes, 80))
    narrower = dedupe_names([n for n in c.narrower if name_key(n) not in dropped], exclude=[c.name, *inclusion], limit=40)
    out, used = [], 0
    for t in narrower:
        used += len(t.split())
        if out and used > 160:
            break
        out.append(t)
    parts.append(_join("Specific codes", out))
    return " ".join(p for p in parts if p)


def _drug_block(c: Concept) -> str:
    brands = dedupe_names([s.text for s in c.synonyms if s.kind == "brand"], exclude=[c.name], limit=15)
    drugbank, formula = c.xref("drugbank_id"), c.xref("formula")
    return " ".join(p for p in (f"DrugBank {drugbank}." if drugbank else "", _join("Brand names", brands),
                                f"Formula {formula}." if formula else "") if p)


def _source_id(c: Concept) -> str:
    if c.source == "MeSH":
        return f"MeSH {c.xref('mesh_id')}"
    if c.source == "ICD-10-CM":
        return f"ICD-10-CM {c.key}"
    if c.source == "drug-NER":
        return f"DrugBank {c.xref('drugbank_id')}" if c.xref("drugbank_id") else "drug"
    return c.id


def render(group: list[Concept], features: dict[str, Disease], hpo_names: dict[str, str],
           feature_of: dict[str, list[tuple[str, float]]], holdout: dict[str, dict[str, Any]]) -> ConceptPassage:
    """The passage of one concept group (first concept = primary)."""
    first = group[0]
    dropped = {name_key(s) for c in group for s in (holdout.get(c.id) or {}).get("synonyms", ())}
    kinds = list(dict.fromkeys(_KIND[_slot(c)] for c in group))
    head = f"{first.name} ({', '.join(kinds)}; {', '.join(_source_id(c) for c in group)})."
    parts = [head]
    for c in group:
        if c.definition and not (holdout.get(c.id) or {}).get("definition"):
            parts.append(c.definition)
    shown = [p for c in group if (p := presentations().get((c.id, c.name))) is not None]
    parts.extend(f"{'Clinical use' if p.id.startswith('DRUG:') else 'Clinical presentation'}: {p.text}" for p in shown)
    names: list[str] = []
    for c in group:
        if c is not first:
            names.append(c.name)
        syns = c.synonyms if c.source != "drug-NER" else [s for s in c.synonyms if s.kind != "brand"]
        if c.source != "ICD-10-CM":
            names.extend(s.text for s in sorted(syns, key=lambda s: s.kind != "layperson"))
    names = [n for n in names if name_key(n) not in dropped]
    parts.append(_join("Also called", dedupe_names(names, exclude=[first.name], limit=30)))
    parents = [p for c in group for p in c.parents if c.source != "ICD-10-CM"]
    parts.append(_join("Type of", dedupe_names(parents, limit=6)))
    feats: dict[str, float] = {}
    for c in group:  # OMIM and Orphanet annotate one disease twice: one list, the higher frequency
        for h, f in features[c.id].phenotypes if c.id in features else ():
            feats[h] = max(feats.get(h, 0.0), f)
    top = sorted(feats.items(), key=lambda kv: -kv[1])[:_MAX_FEATURES]
    parts.append(_join("Presents with", [f"{hpo_names[h]} ({frequency_label(f)})" for h, f in top if h in hpo_names]))
    for c in group:
        if c.source == "ICD-10-CM":
            parts.append(_icd_block(c, dropped))
        elif c.source == "drug-NER":
            parts.append(_drug_block(c))
    text = _words(" ".join(p for p in parts if p), _MAX_WORDS)
    labels = list(dict.fromkeys(DISEASE_SOURCE if c.source == DISEASE_SOURCE else c.source for c in group))
    labels += [PRESENTATION_SOURCE] if shown else []
    meta: dict[str, Any] = {"source_ids": [c.id for c in group], "sources": labels, "names": _names(group, dropped)}
    # drug uses too: on the dev sets this beat keeping them out of the clinical ranking (dev MRR 0.649 vs 0.640)
    if shown:  # searched alone too (retrieval.clinical_weight): descriptions of patients meet presentations
        meta["clinical"] = " ".join(p.text for p in shown)
    ds = feature_of.get(first.id, []) if first.source == "HPO" else []
    common = sorted((x for x in ds if x[1] >= 0.3), key=lambda x: -x[1])[:_MAX_DISEASES]
    if common:  # only diseases where it is at least frequent: a rare feature says little about the disease
        # for the reader only: searched, a list of disease names pulls the phenotype towards each of them
        meta["search_chars"] = len(text)
        text += (f" A frequent feature of: {'; '.join(n for n, _ in common)}"
                 + (f" (annotated in {len(ds)} diseases)." if len(ds) > len(common) else "."))
    return ConceptPassage(first.id, first.name, text, "+".join(labels), meta)


def _names(group: list[Concept], dropped: set[tuple]) -> list[str]:
    """What the exact-name table knows the concept by: names, exact synonyms, ICD inclusion terms, drug variants."""
    out = [c.name for c in group]
    for c in group:
        if c.source == "ICD-10-CM":
            out += [s.text for s in c.synonyms if s.kind == "inclusion"]
        else:
            out += [s.text for s in c.exact_synonyms]
    return list(dict.fromkeys(n for n in out if name_key(n) not in dropped))


def _items(sources: Sequence[str], diseases: bool) -> list[Concept]:
    items = [c for s in sources for c in concepts(s) if not c.stub]
    if "HPO" in sources and diseases:
        items += disease_concepts()
    return items


def merged_passages(sources: Sequence[str] | None = None, holdout: dict[str, dict[str, Any]] | None = None,
                    diseases: bool = True, phenotype_side: bool = True) -> Iterator[ConceptPassage]:
    """One passage per concept group of ``sources`` (default: all), groups in source order of their first concept.

    ``holdout`` (benchmarks): ``{concept_id: {"synonyms": [...], "definition": bool}}`` texts to leave out.
    """
    chosen = list(SOURCES if sources is None else sources)
    holdout = holdout or {}
    items = _items(chosen, diseases)
    held = {cid: {link_key(s) for s in h.get("synonyms", ())} for cid, h in holdout.items()}
    groups = _groups(items, held)
    features: dict[str, Disease] = {}
    feature_of: dict[str, list[tuple[str, float]]] = {}
    hpo_names: dict[str, str] = {}
    if "HPO" in chosen:
        hpo_names = {c.id: c.name for c in concepts("HPO")}
        for d in hpo_diseases():
            features[d.id] = d
            for h, f in d.phenotypes if phenotype_side else ():
                feature_of.setdefault(h, []).append((d.name, f))
    order = {s: i for i, s in enumerate(chosen)}
    groups.sort(key=lambda g: (order.get(items[g[0]].source, len(order)), g[0]))
    seen: set[str] = set()
    for g in groups:
        p = render([items[i] for i in g], features, hpo_names, feature_of, holdout)
        pid, n = p.id, 1
        while pid in seen:  # records sharing a concept id (medrwr.vocab.concepts) keep a passage each
            n += 1
            pid = f"{p.id}#{n}"
        seen.add(pid)
        yield p if pid == p.id else ConceptPassage(pid, p.title, p.text, p.source, p.metadata)


def merge_stats(passages: Iterable[ConceptPassage]) -> dict[str, Any]:
    """How many source concepts were merged: passages, concepts, and counts by group composition."""
    comp: Counter[str] = Counter()
    n_concepts = n = 0
    for p in passages:
        n += 1
        n_concepts += len(p.metadata["source_ids"])
        if len(p.metadata["source_ids"]) > 1:
            comp["+".join(sorted({i.split(":", 1)[0] for i in p.metadata["source_ids"]}))] += 1
    return {"passages": n, "concepts": n_concepts, "merged_concepts": n_concepts - n,
            "groups_by_id_prefix": dict(comp.most_common())}


__all__ = ["DISEASE_SOURCE", "ConceptPassage", "disease_concepts", "link_key", "merge_stats", "merged_passages",
           "render"]
