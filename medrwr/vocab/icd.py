"""ICD-10-CM (NCHS / CMS, public domain), read through ``simple-icd-10-cm``.

Granularity: one concept per 3-character category and one per 4-character code. Billable leaf codes
mostly split a 4-character concept by laterality, episode of care or 7th-character extension ("right
femur, initial encounter"), so their titles and inclusion terms are folded into the 4-character concept
as ``narrower`` names (a category folds in its 4-character children's titles and inclusion terms).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from medrwr.vocab.concepts import Concept, Synonym, import_source


def _concept(cm: Any, code: str, folded: Sequence[str]) -> Concept:
    parent = cm.get_parent(code)
    parents: tuple[str, ...] = ()
    parent_ids: tuple[str, ...] = ()
    if parent and not cm.is_chapter_or_block(parent):  # chapters and blocks are not concepts
        parents, parent_ids = (cm.get_description(parent),), (f"ICD10CM:{parent}",)
    synonyms = tuple(Synonym(t, kind="inclusion") for t in cm.get_inclusion_term(code)) + tuple(
        Synonym(t, kind="includes") for t in cm.get_includes(code))
    notes = cm.get_notes(code)
    notes = (notes,) if isinstance(notes, str) else tuple(n for n in notes if n)
    narrower: list[str] = []
    for d in folded:
        narrower.append(cm.get_description(d))
        narrower.extend(cm.get_inclusion_term(d))
    return Concept(id=f"ICD10CM:{code}", name=cm.get_description(code), source="ICD-10-CM", key=code,
                   synonyms=synonyms, parents=parents, parent_ids=parent_ids, notes=notes,
                   narrower=tuple(narrower))


@functools.cache
def icd_concepts() -> tuple[Concept, ...]:
    """ICD-10-CM categories and 4-character codes (~12k), in code order; ids ``ICD10CM:I51.7``."""
    cm = import_source("simple_icd_10_cm", "ICD-10-CM")
    out = []
    for code in cm.get_all_codes(True):
        if cm.is_category(code):
            out.append(_concept(cm, code, cm.get_children(code)))
        elif cm.is_subcategory(code) and len(code) == 5:  # "I51.7": 3 chars + dot + 1
            folded = [d for d in cm.get_descendants(code) if not cm.is_extended_subcategory(d)]
            out.append(_concept(cm, code, folded))
    return tuple(out)


__all__ = ["icd_concepts"]
