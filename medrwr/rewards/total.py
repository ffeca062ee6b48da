"""The weighted total (docs/method.md, "Rewards")::

    σ = w_f·σf + w_a·σa + w_q·(σq_text + σq_img) + w_c·σc + w_l·σl

The terms are the registry's weighted rewards (:data:`medrwr.rewards.registry.TERM_SPECS`), each weighted by
its ``RewardConfig`` field; the paper's weights are the defaults (format 1, accuracy 5, query 0.4,
confidence 5, length 0 -- the length penalty is off). A term whose weight is 0 is not computed, so a stage-1
config (``query_weight: 0``, ``confidence_weight: 0``) needs no image encoder and no policy forward pass.
``rewards.compat`` switches the format reward and the confidence gain to the reference code's variants.

σq_img needs a joint image–text encoder (``rewards.image_encoder``); when none is configured that term is 0.0
for every sample and a warning says so once. σc needs the policy: pass ``model`` and ``processing_class``
(the trainer's), or set ``confidence_weight: 0``.

Range: :meth:`TotalReward.value_range`, the weighted sum of the term ranges -- with the default weights and
the paper's format, [-0.4 - 5·20.72, 2 + 5 + 0.4·3 + 5·20.72].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from medrwr.config import RewardConfig
from medrwr.rewards._common import sample_views
from medrwr.rewards.specs import TERM_SPECS, RewardBatch, Term

logger = logging.getLogger(__name__)


class TotalReward:
    """The weighted total as one TRL reward function; :meth:`components` gives every term per sample.

    `extractor`, `image_encoder` and `confidence_reward` override what the config would build for the
    query-semantic text and image terms and the confidence gain.
    """

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
        overrides = {
            "extractor": extractor,
            "image_encoder": image_encoder,
            "confidence_reward": confidence_reward,
        }
        self.terms: dict[str, Term] = {}
        for spec in TERM_SPECS:
            if getattr(self.config, spec.weight):
                self.terms[spec.name] = spec.term(
                    self.config, model=model, processing_class=processing_class, **overrides
                )

    def components(
        self,
        completions: Sequence[Any] | None = None,
        traces: Sequence[Any] | None = None,
        answer: Any = None,
        **kwargs: Any,
    ) -> dict[str, list[float]]:
        """Each unweighted term per sample (terms with weight 0 are absent)."""
        batch = RewardBatch(sample_views(completions, traces), answer, kwargs)
        return {name: term(batch) for name, term in self.terms.items()}

    def weights(self) -> dict[str, float]:
        """The weight of every term of the total, by reward name (0 for the terms that are off)."""
        return {spec.name: getattr(self.config, spec.weight) for spec in TERM_SPECS}

    def value_range(self) -> tuple[float, float]:
        """Bounds of the total: the weighted sum of the bounds of the terms that are on."""
        lo = hi = 0.0
        for spec in TERM_SPECS:
            w = getattr(self.config, spec.weight)
            if w:
                a, b = spec.value_range(self.config)
                lo += min(w * a, w * b)
                hi += max(w * a, w * b)
        return lo, hi

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
    >>> r.value_range()
    (0.0, 7.0)
    """
    return TotalReward(
        config,
        model=model,
        processing_class=processing_class,
        extractor=extractor,
        image_encoder=image_encoder,
    )


__all__ = ["TotalReward", "get_total_reward"]
