"""Length penalty σl ∈ {-1, 0} (the reference code's ``LengthORM``; docs/method.md, "Rewards"; off by default).

σl = -1 when the completion without its retrieve blocks (:func:`medrwr.protocol.strip_retrieve_blocks`, what
the model wrote) is shorter than ``min_chars`` (512) or longer than ``max_chars`` (3072) characters, else 0.
Its weight in the total (``rewards.length_weight``) is 0 unless you turn it on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medrwr.protocol import strip_retrieve_blocks
from medrwr.rewards._common import SampleView, sample_views

MIN_CHARS = 512
MAX_CHARS = 3072


def model_chars(text: str) -> int:
    """Characters of `text` outside its retrieve blocks (= ``len(strip_retrieve_blocks(text))``)."""
    if "<retrieve>" not in text:
        return len(text)
    return len(strip_retrieve_blocks(text))


def score_length(view: SampleView, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> float:
    n = model_chars(view.text)
    return 0.0 if min_chars <= n <= max_chars else -1.0


def length_reward(
    completions: Sequence[Any] | None = None, traces: Sequence[Any] | None = None, **kwargs: Any
) -> list[float]:
    """-1.0 outside [512, 3072] model-written characters, else 0.0.

    >>> length_reward(completions=["<think>short</think><answer>A</answer>", "x" * 600])
    [-1.0, 0.0]
    """
    return [score_length(v) for v in sample_views(completions, traces)]


class _LengthReward:
    """Picklable length penalty with its bounds."""

    __name__ = "length_reward"

    def __init__(self, min_chars: int, max_chars: int):
        self.min_chars = int(min_chars)
        self.max_chars = int(max_chars)

    def __call__(self, completions=None, traces=None, **kwargs: Any) -> list[float]:
        return [score_length(v, self.min_chars, self.max_chars) for v in sample_views(completions, traces)]


def get_length_reward(min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> _LengthReward:
    """A length penalty with other bounds (characters of model-written text)."""
    if not 0 <= min_chars <= max_chars:
        raise ValueError(
            f"need 0 <= min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}"
        )
    return _LengthReward(min_chars, max_chars)


__all__ = ["MAX_CHARS", "MIN_CHARS", "get_length_reward", "length_reward", "score_length"]
