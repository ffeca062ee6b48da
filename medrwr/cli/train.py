"""``medrwr train``: GRPO / SFT training."""

from __future__ import annotations

from medrwr.cli._shared import _not_built


def train() -> None:
    """Two-stage GRPO training (not available in this version)."""
    _not_built("train", "train a policy with two-stage GRPO (text-only, then multimodal) using the "
               "rewards in medrwr.rewards")
