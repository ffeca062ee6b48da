"""Rewards, each a batched function usable directly as a TRL reward function (docs/method.md, "Rewards").

TRL calls ``reward(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns,
**rollout_keys)``; our rollout adds the traces under ``traces``. Every reward returns one finite float per
completion and never raises on a completion's content (truncated, malformed, empty or huge).

The rewards, their ranges and weights are listed once, in :mod:`medrwr.rewards.registry`;
:func:`get_reward` builds any of them by name from a :class:`~medrwr.config.RewardConfig`.

>>> get_reward("format").__name__
'format_reward'
"""

from __future__ import annotations

from medrwr.rewards.accuracy import accuracy_reward
from medrwr.rewards.confidence_gain import ConfidenceGainReward, get_confidence_gain_reward
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
from medrwr.rewards.registry import (
    REWARD_NAMES,
    REWARD_SPECS,
    RewardFunc,
    RewardSpec,
    get_reward,
)
from medrwr.rewards.total import TotalReward, get_total_reward

__all__ = [
    "REWARD_NAMES",
    "REWARD_SPECS",
    "ConfidenceGainReward",
    "EntityExtractor",
    "LexiconEntityExtractor",
    "RewardFunc",
    "RewardSpec",
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
