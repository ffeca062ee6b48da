"""The ``standard`` preset (docs/BENCHMARKS.md §9): one documented protocol that fixes MedEvalKit's bugs.

Routing by the record: ``mcq`` (options) → letter extraction, unparsed counted wrong; ``is_yes_no`` → yes/no
without substring matching; other ``closed`` → normalised exact match; ``open`` → EM, token recall, token F1
(correct = EM). An empty or unparseable answer lands in the ``unparsed`` bucket.
"""

from __future__ import annotations

import random
import re

from medrwr.eval.record import EvalRecord, Verdict
from medrwr.eval.scoring._text import extract_answer, most_similar_index, normalize_option, open_metrics, yes_no

__all__ = ["extract_letter", "golds_of", "judge_standard"]

_WRAPPED_RE = re.compile(r"^[\s*_`'\"(\[{]*([A-Ja-j])[\s*_`'\")\]}.:]*$")
_LEADING_RE = re.compile(r"^[\s*_`'\"(\[{]*([A-Ja-j])\s*[.:)\]}]+\s*(\S.*)$", re.DOTALL)
_BARE_LEADING_RE = re.compile(r"^[\s*]*([A-J])\s+(\S.*)$", re.DOTALL)
_OPTION_LINE_RE = re.compile(r"^\s*\(?[A-J]\s*[.):]", re.MULTILINE)
_MARKER_RE = re.compile(
    r"(?:(?i:answer|option|choice)\s*(?i:is)?\s*[:=\-]?\s*|答案\s*[是为:：]?\s*)"
    r"[*_`'\"]*(?:\(([A-Ja-j])\)|\[([A-Ja-j])\]|([A-J])(?![A-Za-z0-9'])|([a-j])(?=[.:)]|\s*$))"
)


def extract_letter(text: str, options: dict[str, str]) -> tuple[str | None, str]:
    """(letter, how) from an extracted answer: a lone letter (``B``, ``(B)``, ``B.``, ``**B**``), a leading
    ``B. text`` / ``B: text`` / ``B) text``, the last ``answer is (B)`` / ``Answer: B`` / ``option B`` / ``答案是B``
    marker, else the one option whose text the answer matches. ``(None, "unparsed")`` otherwise.

    >>> opts = {"A": "Liver", "B": "Pericardial effusion", "C": "Lung"}
    >>> [extract_letter(t, opts)[0] for t in ["(B)", "B. Pericardial effusion", "The answer is C.", "lung", "hmm"]]
    ['B', 'B', 'C', 'C', None]
    """
    valid = set(options)
    t = text.strip()
    m = _WRAPPED_RE.match(t)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper(), "letter"
    echoed = len(_OPTION_LINE_RE.findall(t)) >= 2  # the answer repeats the option list: its first line is no pick
    m = _LEADING_RE.match(t)
    if m and m.group(1).upper() in valid and not echoed:
        return m.group(1).upper(), "leading_letter"
    m = _BARE_LEADING_RE.match(t)
    if m and m.group(1) in valid and normalize_option(m.group(2)) == normalize_option(options[m.group(1)]):
        return m.group(1), "leading_letter"
    hits = [next(g for g in mm.groups() if g) for mm in _MARKER_RE.finditer(t)]
    hits = [h.upper() for h in hits if h.upper() in valid]
    if hits:
        return hits[-1], "marker"
    if echoed:
        return None, "unparsed"
    letter = _option_text_match(t, options)
    if letter:
        return letter, "option_text"
    return None, "unparsed"


def _option_text_match(text: str, options: dict[str, str]) -> str | None:
    norm = normalize_option(text)
    if not norm:
        return None
    normed = {k: normalize_option(v) for k, v in options.items()}
    exact = [k for k, v in normed.items() if v and v == norm]
    if len(exact) == 1:
        return exact[0]
    padded = f" {norm} "
    inside = [k for k, v in normed.items() if v and f" {v} " in padded]
    # "pericardial effusion" also contains option "effusion": keep the longest, drop the ones it contains
    inside = [k for k in inside if not any(k != o and f" {normed[k]} " in f" {normed[o]} " for o in inside)]
    return inside[0] if len(inside) == 1 else None


def golds_of(record: EvalRecord) -> list[str]:
    """The accepted gold texts: ``meta["gold_list"]`` when the source gives several (MMMU), else the answer."""
    golds = record.meta.get("gold_list")
    if isinstance(golds, (list, tuple)) and golds:
        return [str(g) for g in golds]
    return [record.answer]


def judge_standard(record: EvalRecord, response: str | None, *, fallback: str | None = None,
                   rng: random.Random | None = None, preset: str = "standard") -> Verdict:
    """Score one response by the standard protocol (see the module docstring).

    ``fallback`` (MCQ only, off by default): ``"similarity"`` picks the option most similar to the answer
    (MedEvalKit's guess), ``"random"`` a seeded random letter (official MMMU); either way the verdict's ``note``
    says the letter was guessed.
    """
    text, source = extract_answer(response)
    bucket = record.bucket
    if record.answer_type == "mcq":
        assert record.options is not None
        letter, how = extract_letter(text, record.options)
        if letter is None and fallback:
            letter, how = _guess(text, record, fallback, rng), f"fallback_{fallback}"
        if letter is None:
            return Verdict(False, None, "unparsed", preset, note=f"no option letter found ({source})")
        return Verdict(letter == record.answer.upper(), letter, "mcq", preset, note=f"{how} ({source})")
    if not text:
        return Verdict(False, None, "unparsed", preset, em=0.0, recall=0.0, f1=0.0, note="empty answer")
    if record.is_yes_no:
        got, gold = yes_no(text), yes_no(record.answer)
        if got is None:
            return Verdict(False, None, "unparsed", preset, note=f"no yes/no found ({source})")
        return Verdict(got == gold, got, "yes_no", preset, note=source)
    scores = [open_metrics(g, text) for g in golds_of(record)]
    em, recall, f1 = (max(s[i] for s in scores) for i in range(3))
    return Verdict(em == 1.0, text, bucket, preset, em=em, recall=recall, f1=f1, note=source)


def _guess(text: str, record: EvalRecord, how: str, rng: random.Random | None) -> str:
    letters = list(record.options or {})
    if how == "similarity":
        return letters[most_similar_index([v.lower() for v in (record.options or {}).values()], text.lower())]
    if how == "random":
        return (rng or random.Random(f"42:{record.id}")).choice(letters)
    raise ValueError(f"fallback must be 'similarity' or 'random', got {how!r}")
