"""The reasoning-with-retrieval protocol: tags, prompts, the transcript parser and answer extraction.

Grammar of a valid trajectory (docs/method.md §1)::

    ( think query retrieve )* think answer

Whitespace may separate blocks; any other text outside blocks is invalid. Blocks are non-empty.
Model-written blocks (think, query, answer) may not contain ``<`` or ``>``; retrieve blocks are written
by the environment and may (documents say ``<5 mm``). A retrieve block ends at the first ``</retrieve>``,
which is why :func:`sanitize_document` neutralises tag text inside documents before insertion.

Nothing here raises on any input string: model mistakes become a verdict, not an exception.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Callable, Literal, Sequence

THINK, QUERY, RETRIEVE, ANSWER = "think", "query", "retrieve", "answer"
TAGS: tuple[str, ...] = (THINK, QUERY, RETRIEVE, ANSWER)
MODEL_TAGS: tuple[str, ...] = (THINK, QUERY, ANSWER)
"""Blocks the model writes; ``retrieve`` is written only by the environment."""

SegmentKind = Literal["think", "query", "retrieve", "answer", "text"]

QUERY_STOP = "</query>"
ANSWER_STOP = "</answer>"
STOP_STRINGS: tuple[str, ...] = (QUERY_STOP, ANSWER_STOP)
"""Generation pauses at these strings (kept in the output)."""

OPTION_LETTERS = "ABCDEFGHIJ"

_OPEN_RE = re.compile(r"<(think|query|retrieve|answer)>")


def open_tag(kind: str) -> str:
    return f"<{kind}>"


def close_tag(kind: str) -> str:
    return f"</{kind}>"


@dataclass(frozen=True)
class Segment:
    """One span of a completion. ``start``/``end`` are character offsets into the parsed text.

    ``kind == "text"`` is anything outside blocks (usually whitespace). For blocks, ``content`` is the
    text between the tags and ``closed`` tells whether the closing tag was found.
    """

    kind: SegmentKind
    start: int
    end: int
    content: str
    closed: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ParsedCompletion:
    """The verdict on one completion: ordered segments, queries, final answer, grammar validity."""

    segments: list[Segment]
    queries: list[str]
    answer: str | None
    valid: bool
    error: str | None = None
    """Human-readable reason when invalid, e.g. ``"empty_block: <query> block at 12 is empty"``."""
    error_code: str | None = None
    """Machine-readable reason class (one of :data:`ERROR_CODES`) when invalid."""
    retrieve_count: int = 0

    @property
    def blocks(self) -> list[Segment]:
        return [s for s in self.segments if s.kind != "text"]

    def to_dict(self) -> dict:
        return {
            "segments": [s.to_dict() for s in self.segments],
            "queries": list(self.queries),
            "answer": self.answer,
            "valid": self.valid,
            "error": self.error,
            "error_code": self.error_code,
            "retrieve_count": self.retrieve_count,
        }


ERROR_CODES: dict[str, str] = {
    "empty": "the completion is empty",
    "text_outside_blocks": "non-whitespace text outside any block",
    "unclosed_block": "a block is opened but never closed",
    "empty_block": "a block is empty",
    "angle_bracket": "a model-written block contains '<' or '>'",
    "missing_think": "a query or answer is not preceded by a think block",
    "query_without_retrieve": "a query is not followed by a retrieve block",
    "retrieve_without_query": "a retrieve block does not follow a query",
    "no_answer": "the trajectory has no answer block",
    "answer_not_last": "blocks follow the answer",
    "bad_order": "blocks are out of the grammar's order",
}


def split_segments(text: str) -> list[Segment]:
    """Split ``text`` into ordered, non-overlapping segments that cover it exactly."""
    segments: list[Segment] = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _OPEN_RE.search(text, pos)
        if m is None:
            segments.append(Segment("text", pos, n, text[pos:], True))
            break
        if m.start() > pos:
            segments.append(Segment("text", pos, m.start(), text[pos : m.start()], True))
        kind = m.group(1)
        closing = close_tag(kind)
        close_at = text.find(closing, m.end())
        if close_at < 0:
            segments.append(Segment(kind, m.start(), n, text[m.end() :], False))  # type: ignore[arg-type]
            break
        end = close_at + len(closing)
        segments.append(Segment(kind, m.start(), end, text[m.end() : close_at], True))  # type: ignore[arg-type]
        pos = end
    return segments


def _invalid(code: str, detail: str) -> tuple[str, str]:
    return code, f"{code}: {detail}"


def _validate(segments: Sequence[Segment]) -> tuple[str, str] | None:
    """Return ``(code, message)`` for the first grammar violation, or None when valid."""
    if not segments or all(s.kind == "text" and not s.content.strip() for s in segments):
        return _invalid("empty", "the completion is empty")
    for s in segments:
        if s.kind == "text":
            if s.content.strip():
                snippet = s.content.strip()[:40]
                return _invalid("text_outside_blocks", f"text outside blocks at {s.start}: {snippet!r}")
            continue
        if not s.closed:
            return _invalid("unclosed_block", f"<{s.kind}> block at {s.start} is never closed")
        if not s.content.strip():
            return _invalid("empty_block", f"<{s.kind}> block at {s.start} is empty")
        if s.kind in MODEL_TAGS and ("<" in s.content or ">" in s.content):
            return _invalid("angle_bracket", f"<{s.kind}> block at {s.start} contains '<' or '>'")
    kinds = [s for s in segments if s.kind != "text"]
    # Walk the grammar ( think query retrieve )* think answer.
    state = "start"  # start | think | query | retrieve | answer
    for s in kinds:
        k = s.kind
        if state == "answer":
            return _invalid("answer_not_last", f"<{k}> block at {s.start} follows the answer")
        if k == THINK:
            if state in ("start", "retrieve"):
                state = THINK
                continue
            if state == THINK:
                return _invalid("bad_order", f"two think blocks in a row at {s.start}")
            return _invalid("query_without_retrieve", f"the query before {s.start} got no retrieve block")
        if k == QUERY:
            if state == THINK:
                state = QUERY
                continue
            if state == QUERY:
                return _invalid("query_without_retrieve", f"two queries in a row at {s.start}")
            return _invalid("missing_think", f"<query> at {s.start} is not preceded by a think block")
        if k == RETRIEVE:
            if state == QUERY:
                state = RETRIEVE
                continue
            return _invalid("retrieve_without_query", f"<retrieve> at {s.start} does not follow a query")
        if k == ANSWER:
            if state == THINK:
                state = ANSWER
                continue
            if state == QUERY:
                return _invalid("query_without_retrieve", f"the query before {s.start} got no retrieve block")
            return _invalid("missing_think", f"<answer> at {s.start} is not preceded by a think block")
    if state != ANSWER:
        return _invalid("no_answer", "the trajectory has no final answer block")
    return None


def parse_completion(text: str) -> ParsedCompletion:
    """Parse any completion text into segments, queries, answer and a grammar verdict. Never raises."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    segments = split_segments(text)
    queries = [s.content.strip() for s in segments if s.kind == QUERY and s.closed and s.content.strip()]
    answers = [s for s in segments if s.kind == ANSWER and s.closed]
    answer = answers[-1].content.strip() if answers else None
    retrieve_count = sum(1 for s in segments if s.kind == RETRIEVE and s.closed)
    problem = _validate(segments)
    code, message = problem if problem else (None, None)
    return ParsedCompletion(
        segments=segments,
        queries=queries,
        answer=answer,
        valid=problem is None,
        error=message,
        error_code=code,
        retrieve_count=retrieve_count,
    )


def strip_retrieve_blocks(text: str) -> str:
    """The completion with every retrieve block (tags included) removed: what the model wrote."""
    return "".join(text[s.start : s.end] for s in split_segments(text) if s.kind != RETRIEVE)


# ---------------------------------------------------------------------------------------------------
# Answer extraction

_LETTER_ONLY_RE = re.compile(r"^[\s(\[]*([A-Za-z])[\s)\].:]*$")
_LEADING_LETTER_RE = re.compile(r"^[\s(\[]*([A-Za-z])\s*(?:[.:)\]]|\s-\s)")
_ANSWER_IS_RE = re.compile(
    r"(?:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*[(\[]?\s*([A-Za-z])(?![A-Za-z'])", re.IGNORECASE
)
_STANDALONE_UPPER_RE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")


def extract_choice(answer_text: str | None, letters: str = OPTION_LETTERS) -> str | None:
    """The option letter chosen in an answer block, upper-case, or None.

    Accepts ``B``, ``b``, ``B.``, ``(B)``, ``B)``, ``B: text``, ``Answer: B``, ``The answer is (B)``.
    Falls back to the first standalone upper-case letter among ``letters``.

    >>> extract_choice("(C) Pneumothorax")
    'C'
    >>> extract_choice("Answer: b")
    'B'
    >>> extract_choice("pneumonia") is None
    True
    """
    if not answer_text or not isinstance(answer_text, str):
        return None
    allowed = set(letters.upper())
    text = answer_text.strip()[:10_000]
    for pattern in (_LETTER_ONLY_RE, _LEADING_LETTER_RE):
        m = pattern.match(text)
        if m and m.group(1).upper() in allowed:
            # A lower-case leading word like "a 5 mm nodule" is not a choice; "a." or "(a)" is.
            if m.group(1).islower() and pattern is _LEADING_LETTER_RE and not re.match(r"^[\s(\[]*[a-z]\s*[.:)\]]", text):
                continue
            return m.group(1).upper()
    m = _ANSWER_IS_RE.search(text)
    if m and m.group(1).upper() in allowed:
        return m.group(1).upper()
    for m in _STANDALONE_UPPER_RE.finditer(text):
        if m.group(1) in allowed:
            return m.group(1)
    return None


_OPTION_LINE_RE = re.compile(r"^\s*\(?([A-J])[.):]\s", re.MULTILINE)


def option_letters_in(text: str) -> str:
    r"""The option letters listed as ``A. ...`` / ``(A) ...`` / ``A: ...`` lines of a question, in order.

    The inverse of :func:`format_question`'s lettering; ``""`` when the text lists none.

    >>> option_letters_in("Which?\nA. x\n(B) y\nC: z")
    'ABC'
    """
    seen: list[str] = []
    for m in _OPTION_LINE_RE.finditer(text or ""):
        if m.group(1) not in seen:
            seen.append(m.group(1))
    return "".join(seen)


_YES = {"yes", "y", "true", "correct", "present", "是"}
_NO = {"no", "n", "false", "incorrect", "absent", "否"}


def extract_yes_no(answer_text: str | None) -> str | None:
    """``"yes"``/``"no"`` when the answer starts with one (after normalisation), else None."""
    norm = normalize_text(answer_text or "")
    if not norm:
        return None
    first = norm.split()[0]
    if first in _YES or norm in _YES:
        return "yes"
    if first in _NO or norm in _NO:
        return "no"
    return None


_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCT_RE = re.compile(r"[^\w\s]")


def normalize_text(text: str | None) -> str:
    """Lower-case, NFKC, drop punctuation and articles, collapse whitespace (SQuAD-style)."""
    if not text:
        return ""
    t = unicodedata.normalize("NFKC", str(text)).lower()
    t = _PUNCT_RE.sub(" ", t)
    t = _ARTICLES_RE.sub(" ", t)
    return " ".join(t.split())


ANSWER_CHOICE_START = re.compile(r"[^\s(\[{*\"']")
"""The first character of an answer that can name the choice: skips whitespace, ``(`` of ``(B)``, ``**``, quotes.

Confidence (docs/method.md §1 and §5) and the confidence-gain reward (§2) both read the model's distribution at the
token holding this character, so they must agree on it.
"""

LETTER_TOKEN_PREFIXES: tuple[str, ...] = ("", " ", ">", "> ", "\n", "(", " (", ">(")
"""Prefixes under which an option letter may be one token (``B``, `` B``, ``>B``, ``(B``...): each letter's
probability is the sum over its single-token spellings, upper and lower case."""


def letter_token_ids(encode: Callable[[str], list[int]], letters: str = OPTION_LETTERS) -> dict[int, str]:
    """Token id -> option letter for every single-token spelling of each letter (see LETTER_TOKEN_PREFIXES)."""
    letter_of: dict[int, str] = {}
    for letter in letters:
        for variant in (letter, letter.lower()):
            for prefix in LETTER_TOKEN_PREFIXES:
                enc = encode(prefix + variant)
                if len(enc) == 1 and enc[0] not in letter_of:
                    letter_of[int(enc[0])] = letter
    return letter_of


def token_index_at_char(decode: Callable[[Sequence[int]], str], ids: Sequence[int], char_pos: int) -> int:
    """Index of the token holding character ``char_pos`` of ``decode(ids)`` (binary search on decoded prefixes)."""
    lo, hi = 0, len(ids)  # the largest i with len(decode(ids[:i])) <= char_pos
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(decode(ids[:mid])) <= char_pos:
            lo = mid
        else:
            hi = mid - 1
    return min(lo, max(len(ids) - 1, 0))


# ---------------------------------------------------------------------------------------------------
# Prompts and inserted text


@functools.lru_cache(maxsize=1)
def _system_prompts() -> dict[str, str]:
    import yaml

    raw = resources.files("medrwr").joinpath("prompts/system.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(raw)


def system_prompt(with_image: bool = True) -> str:
    """The protocol's system prompt: the image variant, or the text-only one used in stage 1."""
    return _system_prompts()["image" if with_image else "text"]


def format_question(question: str, options: Sequence[str] | dict[str, str] | None = None) -> str:
    """The user text: the question, then one ``A. option`` line per option.

    ``options`` is a list (lettered in order) or a mapping letter -> text.
    """
    lines = [question.strip()]
    if options:
        items = options.items() if isinstance(options, dict) else zip(OPTION_LETTERS, options)
        lines += [f"{letter}. {str(text).strip()}" for letter, text in items]
    return "\n".join(lines)


_TAG_TEXT_RE = re.compile(r"</?\s*(think|query|retrieve|answer)\s*>", re.IGNORECASE)


def sanitize_document(text: str) -> str:
    """Neutralise protocol tags inside a retrieved document so it cannot close or open blocks."""
    return _TAG_TEXT_RE.sub(lambda m: m.group(0).replace("<", "‹").replace(">", "›"), text)


def clean_document(text: str) -> str:
    """A document as it is inserted: protocol tags neutralised, whitespace runs collapsed to one space."""
    return " ".join(sanitize_document(text).split())


def numbered_documents(documents: Sequence[str]) -> str:
    """``(1) ...`` lines of the non-empty documents, cleaned (the body of a retrieve block); ``""`` when none."""
    docs = [clean_document(d) for d in documents if d and d.strip()]
    return "\n".join(f"({i}) {d}" for i, d in enumerate(docs, 1))


def format_retrieval(documents: Sequence[str]) -> str:
    """The retrieve block inserted after a query: numbered documents, or ``None`` when empty."""
    return f"<retrieve>\n{numbered_documents(documents) or 'None'}\n</retrieve>\n"


_FAILED = "Retrieval failed:"
_BUDGET_SPENT = "Search budget spent"
_DOC_NUMBER_RE = re.compile(r"(?m)^\s*\(\d+\)\s*")


def format_retrieval_failure(reason: str) -> str:
    """The retrieve block inserted when the retriever failed; the rollout continues."""
    reason = clean_document(reason)[:300] or "unknown error"
    return f"<retrieve>\n{_FAILED} {reason}\n</retrieve>\n"


def format_budget_notice(max_rounds: int) -> str:
    """The retrieve block answering a query written after the search budget is spent."""
    searches = "search" if max_rounds == 1 else "searches"
    return (
        f"<retrieve>\n{_BUDGET_SPENT} ({max_rounds} {searches} allowed). "
        "Answer with the information you have.\n</retrieve>\n"
    )


def retrieved_documents(block_content: str) -> list[str]:
    """The documents of a retrieve block's content: the inverse of :func:`format_retrieval`.

    Empty results, failures and budget notices hold no documents.

    >>> retrieved_documents("\\n(1) a b\\n(2) c\\n")
    ['a b', 'c']
    >>> retrieved_documents(format_budget_notice(3)[len("<retrieve>"):-len("</retrieve>\\n")])
    []
    """
    body = block_content.strip()
    if not body or body == "None" or body.startswith((_FAILED, _BUDGET_SPENT)):
        return []
    return [d.strip() for d in _DOC_NUMBER_RE.split(body) if d.strip()]


__all__ = [
    "ANSWER",
    "ANSWER_CHOICE_START",
    "LETTER_TOKEN_PREFIXES",
    "ERROR_CODES",
    "OPTION_LETTERS",
    "QUERY",
    "QUERY_STOP",
    "ANSWER_STOP",
    "RETRIEVE",
    "STOP_STRINGS",
    "TAGS",
    "THINK",
    "ParsedCompletion",
    "Segment",
    "clean_document",
    "extract_choice",
    "extract_yes_no",
    "format_question",
    "format_retrieval",
    "format_budget_notice",
    "format_retrieval_failure",
    "letter_token_ids",
    "normalize_text",
    "numbered_documents",
    "option_letters_in",
    "parse_completion",
    "retrieved_documents",
    "sanitize_document",
    "split_segments",
    "strip_retrieve_blocks",
    "system_prompt",
    "token_index_at_char",
]
