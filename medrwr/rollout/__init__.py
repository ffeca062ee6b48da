"""Rollout layer: the token-exact reason-query-retrieve loop, its backends, traces and CDIR.

Importing this package stays light (no torch/transformers); backends import them when built.
"""

from medrwr.rollout.backends.base import (
    Continuation,
    GenerationState,
    PolicyBackend,
    ScriptedBackend,
)
from medrwr.rollout.engine import (
    RolloutDriftError,
    RolloutEngine,
    RolloutRequest,
    engine_from_config,
)
from medrwr.rollout.trace import RetrievalRecord, RolloutTrace, TokenSpan, render_trace

__all__ = [
    "Continuation",
    "GenerationState",
    "PolicyBackend",
    "RetrievalRecord",
    "RolloutDriftError",
    "RolloutEngine",
    "RolloutRequest",
    "RolloutTrace",
    "ScriptedBackend",
    "TokenSpan",
    "engine_from_config",
    "render_trace",
]
