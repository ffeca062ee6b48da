"""One short plain-text passage per concept: the default KB's documents and the static encoder's IDF texts.

Kept here, below the retrieval layer, so the static encoder can count its IDF weights over exactly the
passages the default KB indexes without importing the KB. Passages stay short (at most 25 synonyms,
40 folded ICD sub-code terms / 160 words, 80 words of notes) for BM25 length normalisation and the
encoders' windows; repeats that differ only by case, word order, commas or plural are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

from medrwr.vocab.concepts import Concept
from medrwr.vocab.sources import installed_sources, iter_concepts

_MAX_SYNONYMS = 25
_MAX_CHILD_TERMS = 40


def name_key(s: str) -> tuple[str, ...]:
    """Order-, case- and plural-insensitive key of a name, so passages do not repeat a synonym.

    >>> name_key("Heart, enlarged") == name_key("enlarged hearts")
    True
    """
    return tuple(sorted(_singular(w) for w in re.findall(r"[a-z0-9]+", s.lower())))


def _singular(w: str) -> str:
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def dedupe_names(names: Iterable[str], exclude: Iterable[str] = (), limit: int = _MAX_SYNONYMS) -> list[str]:
    """Names in order without repeats by :func:`name_key` (nor any of ``exclude``), at most ``limit``."""
    seen = {name_key(x) for x in exclude}
    out: list[str] = []
    for n in names:
        n = n.strip()
        k = name_key(n)
        if not n or k in seen:
            continue
        seen.add(k)
        out.append(n)
        if len(out) >= limit:
            break
    return out


def _truncate_words(text: str, n: int) -> str:
    words = text.split()
    return text if len(words) <= n else " ".join(words[:n]) + " ..."


def _within_words(items: list[str], budget: int) -> list[str]:
    """Keep items in order until their total word count reaches ``budget``."""
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


def hpo_passage(c: Concept, drop_synonyms: Iterable[str] = ()) -> str:
    syns = dedupe_names(c.synonym_texts, exclude=[c.name, *drop_synonyms])
    text = f"{c.name} (phenotype)."
    if c.definition:
        text += f" {c.definition}"
    text += _join("Synonyms", syns) + _join("Type of", c.parents[:5])
    return text.strip()


def mesh_passage(c: Concept, drop_synonyms: Iterable[str] = ()) -> str:
    syns = dedupe_names(c.synonym_texts, exclude=[c.name, *drop_synonyms])
    text = f"{c.name} (disease, MeSH {c.xref('mesh_id')})."
    return text + _join("Also called", syns) + _join("Type of", c.parents)


def drug_passage(c: Concept, drop_synonyms: Iterable[str] = ()) -> str:
    """The drug package's MeSH ids/trees are left out: for many drugs they name a shared class."""
    syns = dedupe_names([s.text for s in c.synonyms if s.kind != "brand"], exclude=[c.name, *drop_synonyms])
    brands = dedupe_names([s.text for s in c.synonyms if s.kind == "brand"],
                          exclude=[c.name, *syns, *drop_synonyms], limit=15)
    drugbank = c.xref("drugbank_id")
    ids = f", DrugBank {drugbank}" if drugbank else ""
    text = f"{c.name} (drug{ids})." + _join("Also known as", syns) + _join("Brand names", brands)
    formula = c.xref("formula")
    if formula:
        text += f" Formula {formula}."
    return text


def icd_passage(c: Concept, drop_synonyms: Iterable[str] = ()) -> str:
    title = c.name
    parts = [f"{title} (ICD-10-CM {c.key})."]
    if c.parents:
        parts.append(f"Category: {c.parents[0]}.")
    inclusion = dedupe_names(c.synonym_texts, exclude=[title, *drop_synonyms])
    if inclusion:
        parts.append(f"Includes: {'; '.join(inclusion)}.")
    if c.notes:
        parts.append(_truncate_words(" ".join(c.notes), 80))
    narrower = dedupe_names(c.narrower, exclude=[title, *inclusion], limit=_MAX_CHILD_TERMS)
    sub_terms = _within_words(narrower, 160)
    if sub_terms:
        parts.append(f"Specific codes: {'; '.join(sub_terms)}.")
    return " ".join(parts)


_RENDER = {"HPO": hpo_passage, "MeSH": mesh_passage, "drug-NER": drug_passage, "ICD-10-CM": icd_passage}


def passage(c: Concept, drop_synonyms: Iterable[str] = ()) -> str:
    """The passage text of ``c`` (its title is ``c.name``); ``drop_synonyms`` hold names out (benchmarks)."""
    return _RENDER[c.source](c, drop_synonyms)


def reference_texts(sources: Sequence[str] | None = None) -> Iterator[str]:
    """``"<name>\\n<passage>"`` of every concept of the installed vocabularies (or ``sources``), KB order."""
    for c in iter_concepts(installed_sources() if sources is None else sources):
        if not c.stub:
            yield f"{c.name}\n{passage(c)}"


__all__ = ["dedupe_names", "name_key", "passage", "reference_texts"]
