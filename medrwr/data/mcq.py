"""What the ``write`` stage asks the LLM for, and the checks a reply must pass.

A reply is a JSON object ``{"question", "options": {"A".."D"}, "answer": letter, "explanation"}`` (the request
carries it as a JSON schema, ``response_format: json_schema``). :func:`validate_mcq` accepts 2-4 options and
rejects, with a reason the retry prompt quotes back: malformed JSON, missing fields, an answer that is not one of
the options, repeated options, options that make several answers right ("all of the above", "A and B"), and a
question that gives its answer away (the correct option's text inside the question).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["LETTERS", "MCQ", "SCHEMA", "messages_for", "validate_mcq"]

LETTERS = "ABCD"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "question": {"type": "string"},
        "options": {"type": "object", "properties": {x: {"type": "string"} for x in LETTERS},
                    "required": list(LETTERS), "additionalProperties": False},
        "answer": {"type": "string", "enum": list(LETTERS)},
        "explanation": {"type": "string"},
    },
    "required": ["question", "options", "answer", "explanation"],
    "additionalProperties": False,
}

SYSTEM = ("You write multiple-choice questions that train medical vision-language models to read images. "
          "Reply with one JSON object only.")

PROMPT = """Below is the caption of a medical image. Write ONE multiple-choice question about what the image \
shows that a reader of the image can answer (the caption is only for you: the reader sees the image, not the caption).

Rules:
- exactly 4 options, A to D; exactly one is correct; no "all/none of the above" and no option combining others;
- the options are distinct and plausible; the question must not contain the text of the correct option;
- "explanation": two or three sentences of medical reasoning for the correct answer.

Caption: {caption}

Reply as JSON: {{"question": "...", "options": {{"A": "...", "B": "...", "C": "...", "D": "..."}}, \
"answer": "A", "explanation": "..."}}"""

_MULTI = re.compile(r"\b(all|none|both) of the (above|options)\b|^\s*(both\s+)?[A-D]\s*(and|&|,)\s*[A-D]\b", re.I)


@dataclass
class MCQ:
    """A validated question: ``options`` maps letters (from A, in order) to texts; ``answer`` is one of them."""

    question: str
    options: dict[str, str]
    answer: str
    explanation: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def messages_for(caption: str, rejected: list[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """The chat for one caption; each earlier ``(reply, reason)`` that failed validation is quoted back."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT.format(caption=caption)}]
    for reply, reason in rejected:
        msgs += [{"role": "assistant", "content": reply},
                 {"role": "user", "content": f"That question was rejected: {reason}. Write a new one, as JSON."}]
    return msgs


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def validate_mcq(reply: str | None) -> tuple[MCQ | None, str]:
    """``(MCQ, "")`` for a good reply, else ``(None, reason)``.

    >>> validate_mcq('{"question": "Which organ?", "options": {"A": "Liver", "B": "Lung"}, "answer": "B", '
    ...              '"explanation": "Air."}')[0].answer
    'B'
    >>> validate_mcq('{"question": "Is the lung or liver shown? Lung", "options": {"A": "Liver", "B": "Lung"}, '
    ...              '"answer": "B", "explanation": ""}')[1]
    'the question contains the correct option (B: Lung)'
    >>> validate_mcq('not json')[1]
    'the reply is not a JSON object'
    """
    try:
        obj = json.loads(reply or "")
    except (json.JSONDecodeError, TypeError):
        obj = None
    if not isinstance(obj, dict):
        return None, "the reply is not a JSON object"
    q, opts, ans, exp = obj.get("question"), obj.get("options"), obj.get("answer"), obj.get("explanation", "")
    if not isinstance(q, str) or not q.strip():
        return None, "'question' is missing or empty"
    if isinstance(opts, list):
        opts = dict(zip(LETTERS, opts))
    if not isinstance(opts, dict) or not all(isinstance(v, str) for v in opts.values()):
        return None, "'options' must map letters to texts"
    opts = {str(k).strip().upper(): " ".join(v.split()) for k, v in opts.items() if isinstance(v, str) and v.strip()}
    if not 2 <= len(opts) <= len(LETTERS) or sorted(opts) != list(LETTERS[: len(opts)]):
        return None, f"need 2 to {len(LETTERS)} non-empty options lettered from A, got {sorted(opts) or 'none'}"
    if not isinstance(ans, str) or ans.strip().upper()[:1] not in opts or len(ans.strip().rstrip(".)")) != 1:
        return None, f"'answer' must be exactly one option letter of {''.join(sorted(opts))}, got {ans!r}"
    ans = ans.strip().upper()[:1]
    normed = [_norm(v) for v in opts.values()]
    if len(set(normed)) < len(normed):
        return None, "two options are the same"
    if any(_MULTI.search(v) for v in opts.values()):
        return None, "an option makes several answers correct (all/none of the above, or a combination)"
    correct = _norm(opts[ans])
    if correct and re.search(rf"(^|\s){re.escape(correct)}(\s|$)", _norm(q)) and len(correct) >= 3:
        return None, f"the question contains the correct option ({ans}: {opts[ans]})"
    return MCQ(" ".join(q.split()), dict(sorted(opts.items())), ans, exp.strip() if isinstance(exp, str) else ""), ""
