"""Our weighted reward as verl's ``custom_reward_function`` (docs/scaling.md).

verl 0.9.1's reward managers call ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=,
**reward_kwargs)`` once per rollout; ``extra_info`` is the row's ``extra_info`` updated with the agent loop's
``extra_fields``. Our loop (:mod:`medrwr.train.verl`) puts the whole :class:`~medrwr.rollout.trace.RolloutTrace`
there (:data:`TRACE_KEY`), so the rewards read the trace exactly as they do under TRL (no re-parsing of the
decoded string, which verl decodes with special tokens skipped). Without a trace (another agent loop) the
decoded string is scored.

``reward_kwargs`` name our config the way ``medrwr train`` takes it: ``config`` (a YAML file such as
``configs/stage2.yaml``) and ``overrides`` (``--set`` strings). Its ``rewards.*`` weights make stage 1
(accuracy + format) or stage 2 (+ query semantic). The confidence gain needs a forward pass of the policy,
which verl's reward workers do not hold: a config with ``rewards.confidence_weight`` > 0 is refused with one
line (set it to 0 for verl; docs/scaling.md says what is missing).

The returned dict has ``score`` (the weighted total, what verl optimises) and every term by name plus a few
rollout statistics; verl logs them (same keys for every rollout, as its batching needs).

>>> out = compute_score("medrwr/mcq", "<think>a</think><answer>B</answer>", "B", {},
...                     overrides=["rewards.query_weight=0", "rewards.confidence_weight=0"])
>>> out["score"], out["accuracy"], out["format"]
(6.0, 1.0, 1.0)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from medrwr.errors import ConfigError

__all__ = ["IMAGES_KEY", "TRACE_KEY", "compute_score", "total_reward"]

TRACE_KEY = "medrwr_trace"
"""``extra_fields`` / ``extra_info`` key of the rollout's trace (``RolloutTrace.to_dict()``)."""
IMAGES_KEY = "medrwr_images"
"""``extra_fields`` key of the question's images, sent only when the image-query term is on."""


@functools.lru_cache(maxsize=8)
def total_reward(config: str | None = None, overrides: tuple[str, ...] = ()) -> Any:
    """The :class:`~medrwr.rewards.total.TotalReward` of a config (built once per worker process)."""
    from medrwr.config import load_config
    from medrwr.rewards.registry import get_reward

    cfg = load_config(config, list(overrides))
    if cfg.rewards.confidence_weight:
        raise ConfigError(
            f"rewards.confidence_weight={cfg.rewards.confidence_weight}: the confidence gain needs the policy's "
            "forward pass, which verl's reward workers do not have; set rewards.confidence_weight=0 for verl "
            "(or train stage 2 with medrwr train on TRL)"
        )
    return get_reward("total", cfg.rewards)


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    *,
    config: str | None = None,
    overrides: Sequence[str] = (),
    **_: Any,
) -> dict[str, float]:
    """verl's reward function: ``{"score": total, <term>: value, ...}`` for one rollout (module docstring)."""
    from medrwr.rewards.specs import TERM_SPECS
    from medrwr.rollout.trace import RolloutTrace

    reward = total_reward(config, tuple(str(o) for o in overrides or ()))
    info = dict(extra_info or {})
    trace = info.get(TRACE_KEY)
    traces = [trace if isinstance(trace, RolloutTrace) else RolloutTrace.from_dict(trace)] if trace else None
    columns: dict[str, Any] = {}
    if info.get("options") is not None:
        columns["options"] = [list(info["options"])]
    if info.get(IMAGES_KEY) is not None:
        columns["images"] = [list(info[IMAGES_KEY])]
    parts = reward.components(completions=[solution_str], traces=traces, answer=[ground_truth], **columns)
    weights = reward.weights()
    out = {"score": float(sum(weights[name] * values[0] for name, values in parts.items()))}
    for spec in TERM_SPECS:
        out[spec.name] = float(parts[spec.name][0]) if spec.name in parts else 0.0
    t = traces[0] if traces else None
    out["retrieval_rounds"] = float(t.rounds) if t else 0.0
    out["valid"] = float(bool(t.valid)) if t else 0.0
    out["answered"] = float(t.stop_reason == "answer") if t else 0.0
    return out
