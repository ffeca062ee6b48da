"""Policy backends behind one interface (:class:`~medrwr.rollout.backends.base.PolicyBackend`).

The backends are listed in :mod:`medrwr.rollout.backends.registry`; ``hf`` (transformers, CPU/GPU) and
``vllm`` (GPU, an extra) are imported only when built.
"""

from medrwr.rollout.backends.base import (
    BackendError,
    Continuation,
    GenerationState,
    MultimodalInputs,
    PolicyBackend,
    PromptInputs,
    ScriptedBackend,
)
from medrwr.rollout.backends.registry import BACKENDS, BackendSpec, build_backend, policy_supports_images

__all__ = [
    "BACKENDS",
    "BackendError",
    "BackendSpec",
    "Continuation",
    "GenerationState",
    "MultimodalInputs",
    "PolicyBackend",
    "PromptInputs",
    "ScriptedBackend",
    "build_backend",
    "policy_supports_images",
]
