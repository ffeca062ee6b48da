"""Policy backends behind one interface (:class:`~medrwr.rollout.backends.base.PolicyBackend`).

``hf`` (transformers, CPU/GPU) and ``vllm`` (GPU, an extra) are imported only when chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medrwr.rollout.backends.base import (
    BackendError,
    Continuation,
    GenerationState,
    MultimodalInputs,
    PolicyBackend,
    PromptInputs,
    ScriptedBackend,
)

if TYPE_CHECKING:  # pragma: no cover
    from medrwr.config import ModelConfig, RolloutConfig

__all__ = [
    "BackendError",
    "Continuation",
    "GenerationState",
    "MultimodalInputs",
    "PolicyBackend",
    "PromptInputs",
    "ScriptedBackend",
    "build_backend",
    "policy_supports_images",
]


def policy_supports_images(name_or_path: str | None) -> bool | None:
    """Whether a checkpoint is a vision-language model, from its config alone (no weights loaded).

    None (the packaged SmolLM2) and ``.gguf`` files are text-only. Returns None when the config cannot be
    read (e.g. a hub id on an offline machine): loading the model will then say what is wrong.
    """
    if name_or_path is None or str(name_or_path).endswith(".gguf"):
        return False
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(name_or_path))
    except (OSError, ValueError):
        return None
    return hasattr(config, "vision_config")


def build_backend(model: ModelConfig, rollout: RolloutConfig) -> PolicyBackend:
    """The policy named by ``model`` (hub id, local path, ``.gguf``; None = packaged SmolLM2) on its backend."""
    if model.backend == "vllm":
        from medrwr.rollout.backends.vllm import VLLMBackend

        return VLLMBackend.load(
            model.name, dtype=model.dtype, temperature=rollout.temperature, top_p=rollout.top_p, seed=rollout.seed
        )
    from medrwr.rollout.backends.hf import load_hf_policy

    return load_hf_policy(
        model.name,
        dtype=model.dtype,
        device=model.device,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        seed=rollout.seed,
    )
