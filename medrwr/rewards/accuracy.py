"""Accuracy reward σa ∈ {0, 1} (docs/method.md §2).

For option questions σa = 1 when the letter chosen in the answer block (:func:`medrwr.protocol.extract_choice`:
``B``, ``b``, ``B.``, ``(B)``, ``B)``, ``B: text``, ``Answer: B``) equals the gold letter. When the answer
names no letter but its text equals the gold option's text (normalised), it counts as correct too. For
non-option answers: ``yes``/``no`` answers compare their polarity, anything else is a normalised exact match
(:func:`medrwr.protocol.normalize_text`). No answer block -> 0.

Columns read: ``answer`` (gold) and ``options``/``choices`` (see :mod:`medrwr.rewards._common`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medrwr.protocol import extract_yes_no, normalize_text
from medrwr.rewards._common import (
    Gold,
    SampleView,
    column,
    option_map,
    resolve_gold,
    sample_views,
)

ANSWER_COLUMNS = ("answer", "solution", "gold")
OPTION_COLUMNS = ("options", "choices")


def gold_answers(n: int, answer: Any = None, **kwargs: Any) -> list[Gold]:
    """The resolved gold answer of each of `n` samples from the ``answer`` and ``options`` columns."""
    answers = column({"answer": answer, **kwargs}, ANSWER_COLUMNS, n)
    options = column(kwargs, OPTION_COLUMNS, n)
    memo: dict[tuple, Gold] = {}  # a GRPO group repeats its gold answer and options
    out = []
    for a, o in zip(answers, options):
        key = (a if isinstance(a, (str, int, type(None))) else id(a), id(o))
        gold = memo.get(key)
        if gold is None:
            gold = memo[key] = resolve_gold(a, o)
        out.append(gold)
    return out


def score_accuracy(view: SampleView, gold: Gold, options: Any = None) -> float:
    """σa of one sample (1.0 or 0.0)."""
    if view.answer is None:
        return 0.0
    if gold.letter is not None:
        if view.choice is not None:
            return 1.0 if view.choice == gold.letter else 0.0
        gold_text = gold.option_text or option_map(options).get(gold.letter)
        if gold_text and normalize_text(view.answer) == normalize_text(gold_text):
            return 1.0
        return 0.0
    if gold.text is None:
        return 0.0
    gold_yn = extract_yes_no(gold.text)
    if gold_yn is not None:
        return 1.0 if extract_yes_no(view.answer) == gold_yn else 0.0
    norm = normalize_text(view.answer)
    return 1.0 if norm and norm == normalize_text(gold.text) else 0.0


def accuracy_reward(
    completions: Sequence[Any] | None = None,
    traces: Sequence[Any] | None = None,
    answer: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """1.0 when the final answer matches the gold ``answer`` column, else 0.0.

    >>> accuracy_reward(
    ...     completions=["<think>x</think><answer>(B) Edema</answer>", "<think>x</think><answer>A</answer>"],
    ...     answer=["B", "B"],
    ... )
    [1.0, 0.0]
    >>> accuracy_reward(completions=["<think>x</think><answer>Yes.</answer>"], answer=["yes"])
    [1.0]
    """
    views = sample_views(completions, traces)
    golds = gold_answers(len(views), answer, **kwargs)
    options = column(kwargs, OPTION_COLUMNS, len(views))
    return [score_accuracy(v, g, o) for v, g, o in zip(views, golds, options)]


__all__ = ["accuracy_reward", "gold_answers", "score_accuracy"]
