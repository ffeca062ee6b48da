"""The reward registry: one :class:`RewardSpec` per reward, read by :func:`get_reward`, ``TotalReward`` and docs.

Adding a reward = one module with the reward, one entry in :data:`SPECS` and, when it is a term of the
weighted total, a ``*_weight`` field on :class:`~medrwr.config.RewardConfig`. The table in
``docs/method.md`` ("Rewards") is :func:`render_table`'s output; a test keeps them equal. Regenerate it with
``python -c "from medrwr.rewards.registry import render_table; print(render_table(), end='')"``.

>>> REWARD_NAMES[:3]
('accuracy', 'format', 'format_compat')
>>> get_reward("accuracy").__name__
'accuracy_reward'
>>> get_reward("acuracy")
Traceback (most recent call last):
...
ValueError: unknown reward 'acuracy'; valid names: accuracy, format, format_compat, length, query_semantic_text, query_semantic_image, confidence_gain, total
"""

from __future__ import annotations

from typing import Any

from medrwr.config import RewardConfig
from medrwr.rewards.specs import SPECS as _REWARD_SPECS
from medrwr.rewards.specs import TERM_SPECS, RewardBatch, RewardFunc, RewardSpec
from medrwr.rewards.total import get_total_reward


def _build_total(
    config: RewardConfig, *, model: Any = None, processing_class: Any = None, **_: Any
) -> RewardFunc:
    return get_total_reward(config, model=model, processing_class=processing_class)


SPECS: tuple[RewardSpec, ...] = (
    *_REWARD_SPECS,
    RewardSpec(
        name="total",
        build=_build_total,
        range=None,
        range_text="weighted sum",
        description="Σ weight · term over the rewards above that have a weight field (terms of weight 0 skipped)",
        stages=(1, 2),
    ),
)
"""Every reward, in the order of the docs table; the total last."""

REWARD_SPECS: dict[str, RewardSpec] = {s.name: s for s in SPECS}
REWARD_NAMES: tuple[str, ...] = tuple(REWARD_SPECS)


def get_spec(name: str) -> RewardSpec:
    """The spec of reward `name`; an unknown name is a ``ValueError`` listing the valid ones."""
    spec = REWARD_SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown reward {name!r}; valid names: {', '.join(REWARD_NAMES)}")
    return spec


def get_reward(
    name: str,
    config: RewardConfig | None = None,
    *,
    model: Any = None,
    processing_class: Any = None,
) -> RewardFunc:
    """A reward by registry name, configured from `config` (defaults when None).

    ``confidence_gain`` (and ``total`` unless ``confidence_weight`` is 0) need the policy `model` and its
    `processing_class`.
    """
    spec = get_spec(name)
    return spec.build(
        config if config is not None else RewardConfig(), model=model, processing_class=processing_class
    )


def render_table() -> str:
    """The Markdown table of rewards in ``docs/method.md``."""
    rows = [
        "| name | range | weight (`rewards.*`) | default | stages | policy | what it scores |",
        "|---|---|---|---|---|---|---|",
    ]
    defaults = RewardConfig()
    for s in SPECS:
        weight = f"`{s.weight}`" if s.weight else "–"
        default = f"{getattr(defaults, s.weight):g}" if s.weight else "–"
        stages = ", ".join(map(str, s.stages)) or "–"
        rng = s.range_text
        if s.compat_range is not None:
            rng += f" (compat: {s.compat_range[0]:g} … {s.compat_range[1]:g})"
        rows.append(
            f"| `{s.name}` | {rng} | {weight} | {default} | {stages} | {'yes' if s.needs_model else '–'} "
            f"| {s.description} |"
        )
    return "\n".join(rows) + "\n"


__all__ = [
    "REWARD_NAMES",
    "REWARD_SPECS",
    "SPECS",
    "TERM_SPECS",
    "RewardBatch",
    "RewardFunc",
    "RewardSpec",
    "get_reward",
    "get_spec",
    "render_table",
]
