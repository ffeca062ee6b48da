"""What every reward reads from one sample, built once per call: the completion, its verdict, the gold answer.

TRL calls a reward as ``reward(prompts=..., completions=..., completion_ids=..., trainer_state=...,
**dataset_columns, **rollout_keys)``. Completions arrive as strings, as chat message lists
(``[{"role": "assistant", "content": ...}]``) or, from our rollout, together with one
:class:`~medrwr.rollout.trace.RolloutTrace` per completion under ``traces``. :func:`sample_views` turns any of
these into :class:`SampleView` records so each reward is a small function over views.

A trace is trusted as the record of the rollout (docs/architecture.md, RolloutTrace: nobody re-parses strings to rebuild it): its
``valid``, ``queries``, ``retrievals``, ``answer`` and ``choice`` are used as they are. A plain string is parsed
once with :func:`medrwr.protocol.parse_completion` (cached by text, so the several rewards of one step share
the parse).

Dataset columns read (one value per completion, as TRL passes them):

- ``answer``: the gold answer -- a letter (``"B"``), a lettered option (``"B. Pneumothorax"``), option text
  (``"Pneumothorax"``, resolved to its letter through ``options``), ``yes``/``no`` or free text.
- ``options`` (alias ``choices``): the options, a list (lettered A, B, ... in order) or a mapping
  letter -> text.
- ``explanation`` (aliases ``rationale``, ``solution``): optional text that explains the gold answer.
- ``gold_content``: optional; when given it replaces "gold option text + explanation" for the semantic reward.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from medrwr.protocol import (
    OPTION_LETTERS,
    RETRIEVE,
    ParsedCompletion,
    extract_choice,
    option_letters_in,
    parse_completion,
    retrieved_documents,
)

_LETTER_ONLY_RE = re.compile(r"^\s*[(\[]?\s*([A-Ja-j])\s*[)\].:]?\s*$")
_LETTERED_RE = re.compile(r"^\s*[(\[]?\s*([A-J])\s*[)\].:]\s*(\S.*)$", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The assistant text of one completion: a string, a message dict or a list of messages.

    >>> completion_text([{"role": "assistant", "content": "<think>x</think>"}])
    '<think>x</think>'
    >>> completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    'ab'
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        content = completion.get("content", "")
        if isinstance(content, str):
            return content
        if isinstance(content, Sequence):
            parts = []
            for part in content:
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif isinstance(part, str):
                    parts.append(part)
            return "".join(parts)
        return "" if content is None else str(content)
    if isinstance(completion, Sequence):
        msgs = [m for m in completion if isinstance(m, Mapping)]
        assistant = [m for m in msgs if m.get("role", "assistant") == "assistant"]
        return "".join(completion_text(m) for m in (assistant or msgs))
    return str(completion)


@functools.lru_cache(maxsize=1024)
def _parse_cached(text: str) -> ParsedCompletion:
    return parse_completion(text)


def parse_text(text: str) -> ParsedCompletion:
    """:func:`parse_completion` with a per-process LRU cache keyed by the text (the rewards of a step share it)."""
    if len(text) > 64_000:  # don't pin huge strings in the cache
        return parse_completion(text)
    return _parse_cached(text)


@dataclass
class SampleView:
    """One completion as the rewards see it."""

    text: str
    valid: bool
    has_think: bool
    queries: list[str]
    retrieved: bool
    answer: str | None
    choice: str | None
    trace: Any = None
    _documents: list[str] | None = field(default=None, repr=False)

    @property
    def documents(self) -> list[str]:
        """Retrieved document texts, in order (from the trace's hits, or the completion's retrieve blocks)."""
        if self._documents is None:
            self._documents = _trace_documents(self.trace) if self.trace is not None else []
        return self._documents


def _trace_documents(trace: Any) -> list[str]:
    docs = []
    for record in getattr(trace, "retrievals", None) or []:
        for hits in getattr(record, "hits", None) or []:
            for hit in hits or []:
                t = getattr(hit, "text", None)
                if isinstance(t, str) and t.strip():
                    docs.append(t)
    return docs


def _view_from_text(text: str) -> SampleView:
    parsed = parse_text(text)
    docs: list[str] = []
    has_think = False
    for seg in parsed.segments:
        if seg.kind == RETRIEVE and seg.closed:
            docs.extend(retrieved_documents(seg.content))
        elif seg.kind == "think" and seg.closed and seg.content.strip():
            has_think = True
    return SampleView(
        text=text,
        valid=parsed.valid,
        has_think=has_think,
        queries=list(parsed.queries),
        _documents=docs,
        retrieved=parsed.retrieve_count > 0,
        answer=parsed.answer,
        choice=extract_choice(parsed.answer),
    )


def _view_from_trace(trace: Any, fallback: Any) -> SampleView:
    text = getattr(trace, "completion_text", None)
    if not isinstance(text, str) or not text:
        text = completion_text(fallback)
    retrievals = getattr(trace, "retrievals", None) or ()
    queries = [q for q in (getattr(trace, "queries", None) or ()) if isinstance(q, str) and q.strip()]
    answer = getattr(trace, "answer", None)
    answer = answer if isinstance(answer, str) else None
    choice = getattr(trace, "choice", None)
    if not (isinstance(choice, str) and len(choice) == 1):
        choice = extract_choice(answer)
    try:
        valid = bool(getattr(trace, "valid", False))
    except (TypeError, ValueError):  # an array or other odd value: not a verdict
        valid = False
    has_think = valid or any(
        getattr(s, "kind", None) == "think" for s in (getattr(trace, "spans", None) or ())
    )
    return SampleView(
        text=text,
        valid=valid,
        has_think=has_think,
        queries=queries,
        retrieved=len(retrievals) > 0,
        answer=answer,
        choice=choice.upper() if choice else None,
        trace=trace,
    )


def _trace_from_dict(d: Mapping[str, Any]) -> Any:
    from medrwr.rollout.trace import RolloutTrace

    try:
        return RolloutTrace.from_dict(dict(d))
    except (TypeError, ValueError, KeyError):
        return str(d.get("completion_text") or "")


def sample_views(completions: Sequence[Any] | None, traces: Sequence[Any] | None) -> list[SampleView]:
    """One :class:`SampleView` per completion; traces win over completion strings when both are given."""
    if traces is not None and not isinstance(traces, (list, tuple)):
        traces = list(traces)
    if completions is not None and not isinstance(completions, (list, tuple)):
        completions = list(completions)
    if traces is None and completions is None:
        raise ValueError("a reward needs `completions` (strings or chat messages) or `traces` (RolloutTrace)")
    if traces is not None and completions is not None and len(traces) != len(completions):
        raise ValueError(
            f"got {len(completions)} completions but {len(traces)} traces; pass one trace per completion"
        )
    n = len(traces) if traces is not None else len(completions)  # type: ignore[arg-type]
    views = []
    for i in range(n):
        raw = completions[i] if completions is not None else ""
        trace = traces[i] if traces is not None else None
        if isinstance(trace, Mapping) and ("completion_ids" in trace or "completion_text" in trace):
            trace = _trace_from_dict(trace)  # a serialised RolloutTrace (to_dict)
        if trace is None or isinstance(trace, (str, list, dict)):
            views.append(_view_from_text(completion_text(trace if trace is not None else raw)))
        else:
            views.append(_view_from_trace(trace, raw))
    return views


def column(kwargs: Mapping[str, Any], names: Sequence[str], n: int) -> list[Any]:
    """The first present dataset column among `names`, as a list of length `n` (None entries when absent)."""
    for name in names:
        value = kwargs.get(name)
        if value is None:
            continue
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            return [value] * n  # one value for the whole batch
        values = list(value)
        if len(values) != n:
            raise ValueError(
                f"column '{name}' has {len(values)} values for {n} completions; pass one per completion"
            )
        return values
    return [None] * n


def option_map(options: Any) -> dict[str, str]:
    """Options as letter -> text. Lists are lettered A, B, ... in order; mappings keep their letters.

    >>> option_map(["Pneumonia", "Edema"])
    {'A': 'Pneumonia', 'B': 'Edema'}
    """
    if options is None:
        return {}
    if isinstance(options, str):
        # "A. x\nB. y" inline options
        found = {}
        for line in options.splitlines():
            m = _LETTERED_RE.match(line)
            if m:
                found[m.group(1)] = m.group(2).strip()
        return found
    if isinstance(options, Mapping):
        return {str(k).strip().upper(): "" if v is None else str(v) for k, v in options.items()}
    if isinstance(options, Sequence):
        return {letter: "" if v is None else str(v) for letter, v in zip(OPTION_LETTERS, options)}
    return {}


def option_letters_from_prompt(prompt: Any) -> str:
    """Letters of ``A. ...`` option lines found in a prompt (string or chat messages), in order."""
    text = prompt if isinstance(prompt, str) else completion_text_all(prompt)
    return option_letters_in(text[-20_000:])


def completion_text_all(messages: Any) -> str:
    """All text of a prompt given as chat messages (any role)."""
    if isinstance(messages, str):
        return messages
    if isinstance(messages, Sequence):
        return "\n".join(completion_text(m) if isinstance(m, Mapping) else str(m) for m in messages)
    return completion_text(messages)


@dataclass(frozen=True)
class Gold:
    """The gold answer resolved against the options: a letter for option questions, else normalised text."""

    letter: str | None
    text: str | None
    option_text: str | None


def resolve_gold(answer: Any, options: Any = None) -> Gold:
    """Resolve a gold ``answer`` column value.

    >>> resolve_gold("B")
    Gold(letter='B', text=None, option_text=None)
    >>> resolve_gold("B. Pneumothorax")
    Gold(letter='B', text=None, option_text='Pneumothorax')
    >>> resolve_gold("Edema", ["Pneumonia", "Edema"])
    Gold(letter='B', text=None, option_text='Edema')
    >>> resolve_gold("yes")
    Gold(letter=None, text='yes', option_text=None)
    """
    opts = option_map(options)
    if answer is None:
        return Gold(None, None, None)
    if isinstance(answer, (int,)) and not isinstance(answer, bool) and opts:
        letters = list(opts)
        if 0 <= answer < len(letters):
            return Gold(letters[answer], None, opts[letters[answer]] or None)
    a = str(answer).strip()
    if not a:
        return Gold(None, None, None)
    m = _LETTER_ONLY_RE.match(a)
    if m and (m.group(1).isupper() or len(a.strip()) <= 3):
        letter = m.group(1).upper()
        return Gold(letter, None, opts.get(letter) or None)
    m = _LETTERED_RE.match(a)
    if m:
        letter = m.group(1)
        return Gold(letter, None, opts.get(letter) or m.group(2).strip())
    if opts:
        from medrwr.protocol import normalize_text

        norm = normalize_text(a)
        for letter, text in opts.items():
            if normalize_text(text) == norm and norm:
                return Gold(letter, None, text)
    return Gold(None, a, None)


__all__ = [
    "Gold",
    "SampleView",
    "column",
    "completion_text",
    "option_letters_from_prompt",
    "option_map",
    "parse_text",
    "resolve_gold",
    "sample_views",
]
