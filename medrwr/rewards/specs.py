"""Reward specs: how each reward is built, weighted and scored as a term of the total (one entry each).

Adding a reward = one module with the reward, one entry in :data:`SPECS` and, when it is a term of the
weighted total, a ``*_weight`` field on :class:`~medrwr.config.RewardConfig`. :mod:`medrwr.rewards.total`
sums the terms; :mod:`medrwr.rewards.registry` adds the total and is what callers use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medrwr.config import RewardConfig
from medrwr.rewards._common import SampleView, column
from medrwr.rewards.accuracy import OPTION_COLUMNS, accuracy_reward, gold_answers, score_accuracy
from medrwr.rewards.confidence_gain import RANGE as CONFIDENCE_RANGE
from medrwr.rewards.confidence_gain import ConfidenceGainReward, get_confidence_gain_reward
from medrwr.rewards.format import (
    COMPAT_RANGE,
    PAPER_RANGE,
    format_compat_reward,
    get_format_reward,
    score_format,
    score_format_compat,
)
from medrwr.rewards.length import length_reward, score_length
from medrwr.rewards.query_semantic import (
    IMAGE_RANGE,
    TEXT_RANGE,
    _QueryImageReward,
    _QueryTextReward,
    get_query_semantic_image_reward,
    get_query_semantic_text_reward,
)

RewardFunc = Callable[..., list]
"""A TRL reward function: keyword arguments in (``completions``, ``traces``, dataset columns, …), floats out."""


@dataclass
class RewardBatch:
    """One call of the total: the samples parsed once and shared by every term."""

    views: list[SampleView]
    answer: Any
    kwargs: dict[str, Any]
    _accuracy: list[float] | None = field(default=None, repr=False)

    def accuracy(self) -> list[float]:
        """σa per sample, computed at most once (the format term needs it too)."""
        if self._accuracy is None:
            n = len(self.views)
            golds = gold_answers(n, self.answer, **self.kwargs)
            options = column(self.kwargs, OPTION_COLUMNS, n)
            self._accuracy = [score_accuracy(v, g, o) for v, g, o in zip(self.views, golds, options)]
        return self._accuracy


Term = Callable[[RewardBatch], list]
"""One unweighted term of the total: a picklable callable from a :class:`RewardBatch` to one float per sample."""


@dataclass(frozen=True)
class RewardSpec:
    """A reward as the registry knows it."""

    name: str
    build: Callable[..., RewardFunc]
    """``build(config, *, model=None, processing_class=None) -> reward function`` (what :func:`get_reward` returns)."""
    range: tuple[float, float] | None
    """Bounds of one value (None: depends on the config, as for the total)."""
    range_text: str
    """The value set as the docs write it: ``{0, 1}`` for discrete values, ``[0, 2]`` for an interval."""
    description: str
    weight: str | None = None
    """The ``RewardConfig`` field weighting this reward in the total; None = not a term of the total."""
    term: Callable[..., Term] | None = None
    """``term(config, *, model=None, processing_class=None, **overrides) -> Term``; required when ``weight`` is set."""
    compat_range: tuple[float, float] | None = None
    """Bounds when ``RewardConfig.compat`` switches the term to the reference code's variant (None: unchanged)."""
    needs_model: bool = False
    """Needs the policy ``model`` and ``processing_class`` (an extra forward pass)."""
    stages: tuple[int, ...] = ()
    """Training stages whose total includes it (docs/method.md "Training": stage 1 accuracy + format, stage 2 all four)."""

    def value_range(self, config: RewardConfig | None = None) -> tuple[float, float] | None:
        """Bounds of one value under `config` (the compat variant's when ``config.compat``)."""
        if config is not None and config.compat and self.compat_range is not None:
            return self.compat_range
        return self.range


# ------------------------------------------------------------------------------------------------ builders
# Module-level functions and functools.partial objects only: rewards and terms must pickle (TRL, DDP workers).


def _plain(fn: RewardFunc) -> Callable[..., RewardFunc]:
    return functools.partial(_return_plain, fn)


def _return_plain(fn: RewardFunc, config: RewardConfig, **_: Any) -> RewardFunc:
    return fn


def _build_format(config: RewardConfig, **_: Any) -> RewardFunc:
    return get_format_reward(config.compat)


def _build_query_text(config: RewardConfig, **_: Any) -> RewardFunc:
    return get_query_semantic_text_reward(config.entity_extractor)


def _build_query_image(config: RewardConfig, **_: Any) -> RewardFunc:
    return get_query_semantic_image_reward(config.image_encoder)


def _build_confidence(
    config: RewardConfig, *, model: Any = None, processing_class: Any = None, **_: Any
) -> RewardFunc:
    return get_confidence_gain_reward(
        model, processing_class, compat=config.compat, batch_size=config.confidence_batch_size
    )


# --------------------------------------------------------------------------------------------------- terms


def _accuracy_term(batch: RewardBatch) -> list[float]:
    return batch.accuracy()


def _format_term(batch: RewardBatch, compat: bool = False) -> list[float]:
    acc = batch.accuracy()
    if compat:
        return [score_format_compat(v.text, a) for v, a in zip(batch.views, acc)]
    return [score_format(v, a) for v, a in zip(batch.views, acc)]


def _length_term(batch: RewardBatch) -> list[float]:
    return [score_length(v) for v in batch.views]


def _score_term(reward: Any, batch: RewardBatch) -> list[float]:
    """A term from a reward object's ``score(views, answer=..., **columns)``."""
    return reward.score(batch.views, answer=batch.answer, **batch.kwargs)


def _term_accuracy(config: RewardConfig, **_: Any) -> Term:
    return _accuracy_term


def _term_format(config: RewardConfig, **_: Any) -> Term:
    return functools.partial(_format_term, compat=bool(config.compat))


def _term_length(config: RewardConfig, **_: Any) -> Term:
    return _length_term


def _term_query_text(config: RewardConfig, *, extractor: Any = None, **_: Any) -> Term:
    return functools.partial(_score_term, _QueryTextReward(extractor or config.entity_extractor))


def _term_query_image(config: RewardConfig, *, image_encoder: Any = None, **_: Any) -> Term:
    return functools.partial(_score_term, _QueryImageReward(image_encoder or config.image_encoder))


def _term_confidence(
    config: RewardConfig,
    *,
    model: Any = None,
    processing_class: Any = None,
    confidence_reward: Any = None,
    **_: Any,
) -> Term:
    if confidence_reward is None:
        if model is None or processing_class is None:
            raise ValueError(
                f"the total reward has confidence_weight={config.confidence_weight} but no policy: pass "
                "model= and processing_class= (the trainer's), or set rewards.confidence_weight=0 (stage 1)"
            )
        confidence_reward = ConfidenceGainReward(
            model, processing_class, compat=config.compat, batch_size=config.confidence_batch_size
        )
    return functools.partial(_score_term, confidence_reward)


# ------------------------------------------------------------------------------------------------ registry

SPECS: tuple[RewardSpec, ...] = (
    RewardSpec(
        name="accuracy",
        build=_plain(accuracy_reward),
        range=(0.0, 1.0),
        range_text="{0, 1}",
        description="chosen option letter (or normalised answer) equals the gold answer",
        weight="accuracy_weight",
        term=_term_accuracy,
        stages=(1, 2),
    ),
    RewardSpec(
        name="format",
        build=_build_format,
        range=PAPER_RANGE,
        range_text="{0, 1, 2}",
        compat_range=COMPAT_RANGE,
        description="valid trajectory with a think block, +1 when it also retrieved and is correct",
        weight="format_weight",
        term=_term_format,
        stages=(1, 2),
    ),
    RewardSpec(
        name="format_compat",
        build=_plain(format_compat_reward),
        range=COMPAT_RANGE,
        range_text="{-2, …, 3}",
        description="the reference code's format reward (in the total: `format` with `compat: true`)",
    ),
    RewardSpec(
        name="length",
        build=_plain(length_reward),
        range=(-1.0, 0.0),
        range_text="{-1, 0}",
        description="reference code only: -1 outside 512–3072 model-written characters; weight 0 by default",
        weight="length_weight",
        term=_term_length,
    ),
    RewardSpec(
        name="query_semantic_text",
        build=_build_query_text,
        range=TEXT_RANGE,
        range_text="[0, 2]",
        description="entity overlap of queries and retrieved documents with the gold content",
        weight="query_weight",
        term=_term_query_text,
        stages=(2,),
    ),
    RewardSpec(
        name="query_semantic_image",
        build=_build_query_image,
        range=IMAGE_RANGE,
        range_text="[-1, 1]",
        description="cosine of image and query embeddings (0 without a joint encoder, `image_encoder`)",
        weight="query_weight",
        term=_term_query_image,
        stages=(2,),
    ),
    RewardSpec(
        name="confidence_gain",
        build=_build_confidence,
        range=CONFIDENCE_RANGE,
        range_text=f"[{CONFIDENCE_RANGE[0]:.2f}, {CONFIDENCE_RANGE[1]:.2f}]",
        description="log-prob of the gold letter with retrieval minus without, read after `<answer>`",
        weight="confidence_weight",
        term=_term_confidence,
        needs_model=True,
        stages=(2,),
    ),
)
"""Every reward but the total, in the order of the docs table and of the terms in the total."""

TERM_SPECS: tuple[RewardSpec, ...] = tuple(s for s in SPECS if s.weight is not None)
"""The terms of the weighted total, in summation order."""

__all__ = ["SPECS", "TERM_SPECS", "RewardBatch", "RewardFunc", "RewardSpec", "Term"]
