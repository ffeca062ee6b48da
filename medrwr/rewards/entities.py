"""Medical entity extraction for the query-semantic reward, behind one small interface.

The reward takes *sets*; which extractor produced them does not matter (same sets -> same reward)::

    EntityExtractor.extract(texts: Sequence[str]) -> list[set[str]]

- :class:`LexiconEntityExtractor` (default; no model download): longest-match over the medical lexicon of
  :mod:`medrwr.rewards.entities_lexicon` (HPO phenotypes, MeSH diseases and drugs from :mod:`medrwr.vocab`).
  Every match is mapped to a canonical concept (synonyms sharing a name across sources are merged, so
  "heart attack" and "myocardial infarction" give the same entity), and abbreviations ("COPD", "MI") match
  case-sensitively in capitals only, so "all" never means acute lymphoblastic leukaemia.
- :class:`ScispacyEntityExtractor` (``pip install 'medrwr[sci]'`` plus a scispaCy model you install
  yourself, e.g. ``en_core_sci_md``; the PyPI package of that name is a placeholder -- never install it):
  scispaCy NER, optionally linked to UMLS CUIs (the reference's setup).

>>> ext = LexiconEntityExtractor.from_terms(
...     {"pneumothorax": ["collapsed lung"], "chronic obstructive pulmonary disease": ["copd"]}
... )
>>> [sorted(s) for s in ext.extract(["Collapsed lungs and COPD", "copd in lower case is not an abbreviation"])]
[['chronic obstructive pulmonary disease', 'pneumothorax'], []]
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from medrwr.rewards.entities_lexicon import (
    Lexicon,
    compile_lexicon,
    is_shared,
    load_lexicon,
    normalize_phrase,
)

logger = logging.getLogger(__name__)


@runtime_checkable
class EntityExtractor(Protocol):
    """Batched medical entity extraction: one set of normalised entity strings (or CUIs) per text."""

    name: str

    def extract(self, texts: Sequence[str]) -> list[set[str]]: ...


# ---------------------------------------------------------------------------------------------- extractors


class _LRU:
    def __init__(self, size: int):
        self.size = size
        self.data: OrderedDict[str, frozenset[str]] = OrderedDict()
        self.lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"size": self.size}  # the memo is per process

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["size"])

    def get(self, key: str) -> frozenset[str] | None:
        with self.lock:
            v = self.data.get(key)
            if v is not None:
                self.data.move_to_end(key)
            return v

    def put(self, key: str, value: frozenset[str]) -> None:
        if self.size <= 0 or len(key) > 100_000:
            return
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.size:
                self.data.popitem(last=False)


class LexiconEntityExtractor:
    """Longest-match medical vocabulary extractor (the default). See the module docstring.

    Results are cached per text (LRU), since a GRPO group shares its gold content and often its documents.
    """

    name = "lexicon"

    def __init__(
        self,
        lexicon: Lexicon | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_size: int = 8192,
    ):
        self._lexicon = lexicon
        self._cache_dir = cache_dir
        self._memo = _LRU(cache_size)

    @classmethod
    def from_terms(cls, terms: Mapping[str, Iterable[str]], **kwargs) -> LexiconEntityExtractor:
        """An extractor over your own vocabulary: concept name -> surface forms."""
        forms = {k: [k, *v] for k, v in terms.items()}
        return cls(compile_lexicon(forms, {k: k for k in terms}), **kwargs)

    @property
    def lexicon(self) -> Lexicon:
        if self._lexicon is None:
            self._lexicon = load_lexicon(self._cache_dir)
        return self._lexicon

    def extract(self, texts: Sequence[str]) -> list[set[str]]:
        lex = self.lexicon
        out = []
        for text in texts:
            if not isinstance(text, str) or not text:
                out.append(set())
                continue
            hit = self._memo.get(text)
            if hit is None:
                hit = frozenset(lex.match(text))
                self._memo.put(text, hit)
            out.append(set(hit))
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._cache_dir is None and self._lexicon is not None and is_shared(self._lexicon):
            state["_lexicon"] = None  # reload from the cache rather than pickling 300k phrases
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


class ScispacyEntityExtractor:
    """scispaCy NER (+ optional UMLS linking to CUIs), the reference's extractor, behind the ``sci`` extra.

    `model` is a spaCy package name or path you installed yourself (``en_core_sci_md``/``_lg`` are not on
    PyPI). With ``linker="umls"`` each entity becomes its top UMLS CUI when one scores above
    ``min_score`` (the linker downloads its ~1 GB index on first use), else its normalised text.
    """

    name = "scispacy"

    def __init__(
        self,
        model: str = "en_core_sci_md",
        linker: str | None = None,
        min_score: float = 0.85,
        batch_size: int = 64,
    ):
        from medrwr._imports import require

        self.spacy = require("spacy", "sci", "scispaCy entity extraction")
        require("scispacy", "sci", "scispaCy entity extraction")
        try:
            self.nlp = self.spacy.load(model)
        except OSError as exc:
            raise OSError(
                f"the scispaCy model {model!r} is not installed. scispaCy models are not on PyPI (the "
                f"'en-core-sci-md' entry there is a placeholder: do not install it); install the model from "
                f"scispaCy's release page (e.g. pip install <url of en_core_sci_md-*.tar.gz>) or pass a local "
                f"path, or use the default lexicon extractor (rewards.entity_extractor=lexicon)"
            ) from exc
        self.linker_name = linker
        self.min_score = float(min_score)
        self.batch_size = int(batch_size)
        if linker:
            import scispacy.abbreviation
            import scispacy.linking  # noqa: F401

            if "abbreviation_detector" not in self.nlp.pipe_names:
                self.nlp.add_pipe("abbreviation_detector")
            self.nlp.add_pipe(
                "scispacy_linker", config={"resolve_abbreviations": True, "linker_name": linker}
            )

    def _entity(self, ent) -> str:
        kb = getattr(ent._, "kb_ents", None) if self.linker_name else None
        if kb:
            cui, score = kb[0]
            if score >= self.min_score:
                return cui
        return normalize_phrase(ent.text)

    def extract(self, texts: Sequence[str]) -> list[set[str]]:
        docs = self.nlp.pipe([t if isinstance(t, str) else "" for t in texts], batch_size=self.batch_size)
        return [{e for e in (self._entity(ent) for ent in doc.ents) if e} for doc in docs]


def get_entity_extractor(spec: str | EntityExtractor | None = "lexicon", **kwargs) -> EntityExtractor:
    """An extractor by name (``lexicon``, ``scispacy`` or ``scispacy:<model>``) or the object itself."""
    if spec is None or spec == "lexicon":
        return LexiconEntityExtractor(**kwargs)
    if isinstance(spec, str):
        if spec == "scispacy" or spec.startswith("scispacy:"):
            model = spec.partition(":")[2] or "en_core_sci_md"
            return ScispacyEntityExtractor(model, **kwargs)
        raise ValueError(
            f"unknown entity extractor {spec!r}; valid: 'lexicon', 'scispacy', 'scispacy:<model>'"
        )
    if isinstance(spec, EntityExtractor):
        return spec
    raise TypeError(
        f"an entity extractor needs an extract(texts) -> list[set[str]] method, got {type(spec).__name__}"
    )


__all__ = [
    "EntityExtractor",
    "LexiconEntityExtractor",
    "ScispacyEntityExtractor",
    "get_entity_extractor",
]
