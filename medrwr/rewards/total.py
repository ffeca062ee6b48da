"""The weighted total (METHOD.md §2)::

    σ = w_f·σf + w_a·σa + w_q·(σq_text + σq_img) + w_c·σc + w_l·σl

with the paper's weights by default (``RewardConfig``: format 1, accuracy 5, query 0.4, confidence 5,
length 0 -- the length penalty is off). A term whose weight is 0 is not computed, so a stage-1 config
(``query_weight: 0``, ``confidence_weight: 0``) needs no image encoder and no policy forward pass.
``rewards.compat`` switches the format reward and the confidence gain to the reference code's variants.

σq_img needs a joint image–text encoder (``rewards.image_encoder``); when none is configured that term is 0.0
for every sample and a warning says so once, so the total is then w_q·σq_text (+ the other terms). σc needs
the policy: pass ``model`` and ``processing_class`` (the trainer's), or set ``confidence_weight: 0``.

Range: the weighted sum of the component ranges -- with the default weights and the paper's format,
[-0.4 - 5·20.72, 2 + 5 + 0.4·3 + 5·20.72].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from medrwr.config import RewardConfig
from medrwr.rewards._common import column, sample_views
from medrwr.rewards.accuracy import OPTION_COLUMNS, gold_answers, score_accuracy
from medrwr.rewards.confidence_gain import ConfidenceGainReward
from medrwr.rewards.format import score_format, score_format_compat
from medrwr.rewards.length import score_length
from medrwr.rewards.query_semantic import _QueryImageReward, _QueryTextReward

logger = logging.getLogger(__name__)


class TotalReward:
    """The weighted total as one TRL reward function; :meth:`components` gives every term per sample."""

    __name__ = "total_reward"

    def __init__(
        self,
        config: RewardConfig | None = None,
        model: Any = None,
        processing_class: Any = None,
        extractor: Any = None,
        image_encoder: Any = None,
        confidence_reward: Any = None,
    ):
        self.config = config or RewardConfig()
        c = self.config
        self.text_reward = _QueryTextReward(extractor or c.entity_extractor) if c.query_weight else None
        self.image_reward = _QueryImageReward(image_encoder or c.image_encoder) if c.query_weight else None
        self.confidence_reward = None
        if c.confidence_weight:
            if confidence_reward is not None:
                self.confidence_reward = confidence_reward
            elif model is None or processing_class is None:
                raise ValueError(
                    "the total reward has confidence_weight="
                    f"{c.confidence_weight} but no policy: pass model= and processing_class= (the trainer's), "
                    "or set rewards.confidence_weight=0 (stage 1)"
                )
            else:
                self.confidence_reward = ConfidenceGainReward(
                    model,
                    processing_class,
                    compat=c.compat,
                    batch_size=getattr(c, "confidence_batch_size", 8),
                )

    def components(
        self,
        completions: Sequence[Any] | None = None,
        traces: Sequence[Any] | None = None,
        answer: Any = None,
        **kwargs: Any,
    ) -> dict[str, list[float]]:
        """Each unweighted term per sample (terms with weight 0 are absent)."""
        c = self.config
        views = sample_views(completions, traces)
        n = len(views)
        out: dict[str, list[float]] = {}
        golds = gold_answers(n, answer, **kwargs)
        options = column(kwargs, OPTION_COLUMNS, n)
        acc = [score_accuracy(v, g, o) for v, g, o in zip(views, golds, options)]
        if c.accuracy_weight:
            out["accuracy"] = acc
        if c.format_weight:
            if c.compat:
                out["format"] = [score_format_compat(v.text, a) for v, a in zip(views, acc)]
            else:
                out["format"] = [score_format(v, a) for v, a in zip(views, acc)]
        if c.length_weight:
            out["length"] = [score_length(v) for v in views]
        if self.text_reward is not None:
            out["query_semantic_text"] = self.text_reward.score(views, answer, **kwargs)
        if self.image_reward is not None:
            out["query_semantic_image"] = self.image_reward.score(views, **kwargs)
        if self.confidence_reward is not None:
            out["confidence_gain"] = self.confidence_reward.score(views, answer, **kwargs)
        return out

    def weights(self) -> dict[str, float]:
        c = self.config
        return {
            "accuracy": c.accuracy_weight,
            "format": c.format_weight,
            "length": c.length_weight,
            "query_semantic_text": c.query_weight,
            "query_semantic_image": c.query_weight,
            "confidence_gain": c.confidence_weight,
        }

    def __call__(self, completions=None, traces=None, answer=None, **kwargs: Any) -> list[float]:
        parts = self.components(completions, traces, answer, **kwargs)
        weights = self.weights()
        n = len(next(iter(parts.values()))) if parts else len(sample_views(completions, traces))
        total = [0.0] * n
        for name, values in parts.items():
            w = weights[name]
            for i, v in enumerate(values):
                total[i] += w * v
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and n:
            for name, values in parts.items():
                try:
                    log_metric(f"rewards/{name}/mean", sum(values) / n)
                except Exception:
                    logger.debug("log_metric failed for %s", name, exc_info=True)
        return total

    def __repr__(self) -> str:
        return f"TotalReward({self.weights()}, compat={self.config.compat})"


def get_total_reward(
    config: RewardConfig | None = None,
    model: Any = None,
    processing_class: Any = None,
    extractor: Any = None,
    image_encoder: Any = None,
) -> TotalReward:
    """The weighted total from a :class:`~medrwr.config.RewardConfig` (paper weights by default).

    >>> from medrwr.config import RewardConfig
    >>> r = get_total_reward(RewardConfig(query_weight=0, confidence_weight=0))
    >>> r(completions=["<think>a</think><answer>B</answer>", "<think>a</think><answer>C</answer>"], answer=["B", "B"])
    [6.0, 1.0]
    """
    return TotalReward(
        config,
        model=model,
        processing_class=processing_class,
        extractor=extractor,
        image_encoder=image_encoder,
    )


__all__ = ["TotalReward", "get_total_reward"]
