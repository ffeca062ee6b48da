"""``medrwr eval``: benchmark evaluation."""

from __future__ import annotations

from medrwr.cli._shared import _not_built


def eval_cmd() -> None:
    """Evaluate on medical VQA benchmarks (not available in this version)."""
    _not_built("eval", "score a policy on medical VQA benchmarks in four settings (direct answer, RAG, "
               "reasoning-with-retrieval, and with CDIR) and save per-question rows beside the summary")
