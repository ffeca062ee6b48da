"""Rewards of METHOD.md §2, each a batched function usable directly as a TRL reward function.

TRL calls ``reward(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns,
**rollout_keys)``; our rollout adds the traces under ``traces``. Every reward returns one finite float per
completion and never raises on a completion's content (truncated, malformed, empty or huge).

========================  ==========================================  =========================================
name                      reward                                      range
========================  ==========================================  =========================================
``accuracy``              :func:`accuracy_reward`                     {0, 1}
``format``                :func:`format_reward`                       {0, 1, 2}
``format_compat``         :func:`format_compat_reward`                {-2, …, 3} (reference code)
``length``                :func:`length_reward`                       {-1, 0} (off in the total by default)
``query_semantic_text``   :func:`query_semantic_text_reward`          [0, 2]
``query_semantic_image``  :func:`get_query_semantic_image_reward`     [-1, 1] (0 without a joint encoder)
``confidence_gain``       :func:`get_confidence_gain_reward`          [-20.72, 20.72] (needs the policy)
``total``                 :func:`get_total_reward`                    weighted sum (paper weights)
========================  ==========================================  =========================================

:func:`get_reward` builds any of them by name from a :class:`~medrwr.config.RewardConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medrwr.rewards.accuracy import accuracy_reward
from medrwr.rewards.confidence_gain import (
    ConfidenceGainReward,
    get_confidence_gain_reward,
)
from medrwr.rewards.entities import (
    EntityExtractor,
    LexiconEntityExtractor,
    ScispacyEntityExtractor,
    get_entity_extractor,
)
from medrwr.rewards.format import format_compat_reward, format_reward, get_format_reward
from medrwr.rewards.length import get_length_reward, length_reward
from medrwr.rewards.query_semantic import (
    get_query_semantic_image_reward,
    get_query_semantic_text_reward,
    query_semantic_image_reward,
    query_semantic_text_reward,
)
from medrwr.rewards.total import TotalReward, get_total_reward

RewardFunc = Callable[..., list]

REWARDS: dict[str, RewardFunc] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "format_compat": format_compat_reward,
    "length": length_reward,
    "query_semantic_text": query_semantic_text_reward,
    "query_semantic_image": query_semantic_image_reward,
}
"""Rewards that need no parameters, by name (the configured ones come from :func:`get_reward`)."""

REWARD_NAMES: tuple[str, ...] = (*REWARDS, "confidence_gain", "total")


def get_reward(
    name: str, config: Any = None, *, model: Any = None, processing_class: Any = None
) -> RewardFunc:
    """A reward by registry name, configured from ``config`` (a ``RewardConfig``; defaults when None).

    ``confidence_gain`` (and ``total`` unless ``confidence_weight`` is 0) need the policy ``model`` and its
    ``processing_class``.

    >>> get_reward("accuracy").__name__
    'accuracy_reward'
    >>> get_reward("acuracy")
    Traceback (most recent call last):
    ...
    ValueError: unknown reward 'acuracy'; valid names: accuracy, format, format_compat, length, query_semantic_text, query_semantic_image, confidence_gain, total
    """
    from medrwr.config import RewardConfig

    cfg = config if config is not None else RewardConfig()
    if name == "format":
        return get_format_reward(cfg.compat)
    if name == "query_semantic_text":
        return get_query_semantic_text_reward(cfg.entity_extractor)
    if name == "query_semantic_image":
        return get_query_semantic_image_reward(cfg.image_encoder)
    if name == "confidence_gain":
        return get_confidence_gain_reward(
            model, processing_class, compat=cfg.compat, batch_size=cfg.confidence_batch_size
        )
    if name == "total":
        return get_total_reward(cfg, model=model, processing_class=processing_class)
    if name in REWARDS:
        return REWARDS[name]
    raise ValueError(f"unknown reward {name!r}; valid names: {', '.join(REWARD_NAMES)}")


__all__ = [
    "REWARDS",
    "REWARD_NAMES",
    "ConfidenceGainReward",
    "EntityExtractor",
    "LexiconEntityExtractor",
    "ScispacyEntityExtractor",
    "TotalReward",
    "accuracy_reward",
    "format_compat_reward",
    "format_reward",
    "get_confidence_gain_reward",
    "get_entity_extractor",
    "get_format_reward",
    "get_length_reward",
    "get_query_semantic_image_reward",
    "get_query_semantic_text_reward",
    "get_reward",
    "get_total_reward",
    "length_reward",
    "query_semantic_image_reward",
    "query_semantic_text_reward",
]
