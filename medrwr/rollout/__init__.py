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
from medrwr.rollout.trace import (
    CDIRAnswer,
    CDIRRecord,
    RetrievalRecord,
    RolloutTrace,
    TokenSpan,
    render_trace,
)
from medrwr.rollout.transcript import Transcript

__all__ = [
    "CDIRAnswer",
    "CDIRRecord",
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
    "Transcript",
    "engine_from_config",
    "render_trace",
]
