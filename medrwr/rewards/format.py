"""Format reward (docs/method.md §2): the paper's σf ∈ {0, 1, 2}, and the reference code's variant behind ``compat``.

Paper (default)::

    σf = 1 if the trajectory is grammar-valid and has a think block      (grammar: protocol.py)
       + 1 if, in addition, it retrieved at least once and σa = 1

The bonus needs a valid trajectory too (as in the reference code, which only paid it on a full match), so
σf ∈ {0, 1, 2}. Retrieved documents may contain ``<`` and ``>`` (``<5 mm``); only model-written blocks may not.

Compat (``compat=True``, the reference's ``MultiStepFormatORM``), σf ∈ {-2, -1, 0, 1, 2, 3}:

- 0 when a tag-like ``<...>`` other than the eight protocol tags, or ``=word>``, appears, or a retrieve
  block does not follow a query (no penalties are subtracted in these cases, as in the reference);
- without queries: 1 for exactly ``<think>…</think> <answer>…</answer>`` (one think, one answer), else 0;
- with queries: ``( think ( query retrieve )? )* answer`` with a single final answer -> 3 when correct
  (σa = 1; the reference also demanded option text after the letter), 1 when not; else 0;
- then -1 if any block is empty or whitespace-only and -1 if three newlines (``\\n``/``\\r``) occur in a row.

Unlike the reference, the checks look at model-written text only: retrieve-block contents are masked before
matching, so a document saying ``<5 mm`` cannot break the format (the reference scored it 0).

Columns read: those of :func:`medrwr.rewards.accuracy.accuracy_reward` (for σa).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from medrwr.protocol import RETRIEVE
from medrwr.rewards._common import SampleView, column, sample_views
from medrwr.rewards.accuracy import OPTION_COLUMNS, gold_answers, score_accuracy

PAPER_RANGE = (0.0, 2.0)
COMPAT_RANGE = (-2.0, 3.0)

_ALLOWED_TAGS = frozenset(
    ["<think>", "</think>", "<query>", "</query>", "<retrieve>", "</retrieve>", "<answer>", "</answer>"]
)
_TAG_LIKE_RE = re.compile(r"<[^<>]+>")  # linear-time stand-in for the reference's <[^>]+>
_ATTR_RE = re.compile(r"=[a-zA-Z]+>")
_NEWLINES_RE = re.compile(r"[\n\r]{3,}")
_EMPTY_BLOCK_RE = re.compile(r"<(think|query|retrieve|answer)>\s*</\1>")
_DIRECT_RE = re.compile(r"^<think>[^<>]*?</think>\s*<answer>[^<>]*?</answer>\s*$", re.DOTALL)
_MULTI_RE = re.compile(
    r"^(?:<think>[^<>]*?</think>(?:\s*<query>[^<>]*?</query>\s*<retrieve>[^<>]*?</retrieve>)?\s*)*"
    r"<answer>[^<>]*?</answer>\s*$",
    re.DOTALL,
)
_DOC_PLACEHOLDER = "doc"


def score_format(view: SampleView, correct: float) -> float:
    """The paper's σf of one sample given its σa."""
    if not (view.valid and view.has_think):
        return 0.0
    return 1.0 + (1.0 if view.retrieved and correct >= 1.0 else 0.0)


def _mask_documents(text: str) -> str:
    """`text` with each closed retrieve block's content replaced by a placeholder (model text kept exactly)."""
    if "<retrieve>" not in text:
        return text
    out = []
    pos = 0
    for _, start, end in find_blocks(text, (RETRIEVE,)):
        content = text[start + len("<retrieve>") : end - len("</retrieve>")]
        if content.strip():
            out.append(text[pos:start])
            out.append(f"<retrieve>{_DOC_PLACEHOLDER}</retrieve>")
            pos = end
    out.append(text[pos:])
    return "".join(out)


def find_blocks(text: str, kinds: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """``re.finditer`` over ``<k>.*?</k>`` alternatives (DOTALL) for `kinds`, in linear time.

    The regex form rescans the rest of the text from every unclosed opening tag (quadratic on a megabyte of
    ``<query>``); here a kind whose closing tag no longer occurs is dropped once.
    """
    out: list[tuple[str, int, int]] = []
    live = {k: (f"<{k}>", f"</{k}>") for k in kinds}
    pos = 0
    while live:
        best = None
        for k, (o, _) in list(live.items()):
            at = text.find(o, pos)
            if at < 0:
                del live[k]
            elif best is None or at < best[1]:
                best = (k, at)
        if best is None:
            break
        k, at = best
        o, c = live[k]
        end = text.find(c, at + len(o))
        if end < 0:
            del live[k]  # no later opening of this kind can close either
            continue
        out.append((k, at, end + len(c)))
        pos = end + len(c)
    return out


def _retrieve_without_query(text: str) -> bool:
    last_was_query = False
    for kind, _, _ in find_blocks(text, ("query", "retrieve")):
        if kind == "query":
            last_was_query = True
        else:
            if not last_was_query:
                return True
            last_was_query = False
    return False


def score_format_compat(text: str, correct: float) -> float:
    """The reference code's format value of one completion text given σa (see the module docstring)."""
    content = _mask_documents(text)
    if _ATTR_RE.search(content) or any(t not in _ALLOWED_TAGS for t in _TAG_LIKE_RE.findall(content)):
        return 0.0
    if _retrieve_without_query(content):
        return 0.0
    answers = find_blocks(content, ("answer",))
    answer_last = len(answers) == 1 and answers[0][2] == len(content.strip())
    if not find_blocks(content, ("query",)) and not find_blocks(content, ("retrieve",)):
        n_think = len(find_blocks(content, ("think",)))
        reward = 1.0 if _DIRECT_RE.match(content) and n_think == 1 and answer_last else 0.0
    elif _MULTI_RE.match(content) and answer_last:
        reward = 3.0 if correct >= 1.0 else 1.0
    else:
        reward = 0.0
    reward -= 1.0 if _EMPTY_BLOCK_RE.search(content) else 0.0
    reward -= 1.0 if _NEWLINES_RE.search(content) else 0.0
    return reward


def _format(views: list[SampleView], compat: bool, answer: Any, kwargs: dict[str, Any]) -> list[float]:
    golds = gold_answers(len(views), answer, **kwargs)
    options = column(kwargs, OPTION_COLUMNS, len(views))
    correct = [score_accuracy(v, g, o) for v, g, o in zip(views, golds, options)]
    if compat:
        return [score_format_compat(v.text, c) for v, c in zip(views, correct)]
    return [score_format(v, c) for v, c in zip(views, correct)]


def format_reward(
    completions: Sequence[Any] | None = None,
    traces: Sequence[Any] | None = None,
    answer: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """The paper's σf ∈ {0, 1, 2}.

    >>> format_reward(
    ...     completions=[
    ...         "<think>a</think><answer>B</answer>",
    ...         "<think>a</think><query>q</query><retrieve>(1) d</retrieve><think>b</think><answer>B</answer>",
    ...         "B",
    ...     ],
    ...     answer=["B", "B", "B"],
    ... )
    [1.0, 2.0, 0.0]
    """
    return _format(sample_views(completions, traces), False, answer, kwargs)


def format_compat_reward(
    completions: Sequence[Any] | None = None,
    traces: Sequence[Any] | None = None,
    answer: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """The reference code's format value ∈ {-2, …, 3}.

    >>> format_compat_reward(
    ...     completions=[
    ...         "<think>a</think><query>q</query><retrieve>d</retrieve><answer>B</answer>",
    ...         "<think>a</think>\\n\\n\\n<answer>B</answer>",
    ...     ],
    ...     answer=["B", "B"],
    ... )
    [3.0, 0.0]
    """
    return _format(sample_views(completions, traces), True, answer, kwargs)


class _FormatReward:
    """Picklable format reward with the compat switch bound."""

    def __init__(self, compat: bool):
        self.compat = bool(compat)
        self.__name__ = "format_compat_reward" if self.compat else "format_reward"

    def __call__(self, completions=None, traces=None, answer=None, **kwargs: Any) -> list[float]:
        return _format(sample_views(completions, traces), self.compat, answer, kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(compat={self.compat})"


def get_format_reward(compat: bool = False) -> _FormatReward:
    """The format reward: the paper's (default) or the reference code's (``compat=True``)."""
    return _FormatReward(compat)


__all__ = [
    "COMPAT_RANGE",
    "PAPER_RANGE",
    "format_compat_reward",
    "format_reward",
    "get_format_reward",
    "score_format",
    "score_format_compat",
]
