"""Classic clinical presentations of common conditions and the uses of common drugs, written for MedRwR.

``data/presentations.jsonl`` (conditions) and ``data/drug_uses.jsonl`` (drugs and antidotes: class, uses in
clinical and everyday words, classic adverse effects, the poisoning an antidote treats).

Why: the vocabularies say what a concept is called and, for rare diseases, which phenotypes HPO annotates, but
not what a common disease looks like in a patient (who gets it, how it presents in clinical and everyday words,
the hallmark findings) -- the associations a question like "child with barking cough" needs. Each line is
``{"id", "name", "text"}``: ``id`` and ``name`` name one vocabulary record exactly (a MeSH id can carry several
records, so both are the key), ``text`` is 40-90 words of original text (MIT, like the code; written with AI
assistance and not clinically reviewed -- see ``attribution.json``). :mod:`medrwr.vocab.merge` puts the text into
that concept's passage.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from medrwr.errors import VocabularyError
from medrwr.vocab.concepts import _data_text

SOURCE = "MedRwR-presentations"
"""The source label passages carry when they include a presentation."""
_FILES = ("presentations.jsonl", "drug_uses.jsonl")


@dataclass(frozen=True)
class Presentation:
    """One condition's classic presentation; ``id`` + ``name`` name the vocabulary record it belongs to."""

    id: str
    name: str
    text: str


@functools.cache
def presentations() -> dict[tuple[str, str], Presentation]:
    """Every shipped presentation and drug use by ``(concept id, concept name)``, read once per process."""
    out: dict[tuple[str, str], Presentation] = {}
    for file in _FILES:
        for n, line in enumerate(_data_text(file).splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                p = Presentation(str(d["id"]), str(d["name"]), " ".join(str(d["text"]).split()))
            except (ValueError, KeyError, TypeError) as exc:
                raise VocabularyError(f"medrwr/vocab/data/{file} line {n} is not an {{id, name, text}} object "
                                      f"({exc}); reinstall medrwr") from None
            out[(p.id, p.name)] = p
    return out


__all__ = ["SOURCE", "Presentation", "presentations"]
