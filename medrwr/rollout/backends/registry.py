"""The policy backends MedRwR can build, listed once: name, factory, the extra it needs, image support.

:func:`build_backend` and the docs read :data:`BACKENDS`; adding a backend means adding one
:class:`BackendSpec` here (and implementing :class:`~medrwr.rollout.backends.base.PolicyBackend`). Factories
import their heavy libraries when called, so listing the backends stays instant.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from medrwr.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from medrwr.config import ModelConfig, RolloutConfig
    from medrwr.rollout.backends.base import PolicyBackend

__all__ = [
    "BACKENDS",
    "BackendSpec",
    "apply_threads",
    "backend_spec",
    "build_backend",
    "policy_supports_images",
    "resolve_threads",
]


@dataclass(frozen=True)
class BackendSpec:
    """One policy backend: how to build it from the model and rollout configs, and what it needs."""

    name: str
    factory: Callable[[ModelConfig, RolloutConfig], PolicyBackend]
    extra: str
    """The ``pip install 'medrwr[<extra>]'`` that provides its libraries."""
    supports_images: bool
    """Whether it can feed images to a vision-language checkpoint (a text-only checkpoint still cannot)."""
    description: str = ""


def resolve_threads(threads: int | None = None) -> int:
    """The torch thread count to use: ``threads`` (``model.threads``) when set, else 1 on a machine with at most
    2 cores, else half the cores (hyper-threads share a core's arithmetic units), at most 8 (a policy this size
    stops gaining). On a shared 2-core machine torch with 2 threads generated 14x slower than with 1 under load
    (docs/stack.md, "Threads and timing"): oversubscription costs far more than the second core gains.

    >>> resolve_threads(3)
    3
    """
    if threads is not None:
        return int(threads)
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else max(1, min(8, cores // 2))


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op CPU threads to ``model.threads`` (None = :func:`resolve_threads`'s default) and
    return the count now in force. Called when a backend loads."""
    from medrwr._imports import require

    torch = require("torch", "models", "the policy backends")
    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _build_hf(model: ModelConfig, rollout: RolloutConfig) -> PolicyBackend:
    from medrwr.rollout.backends.hf import load_hf_policy

    threads = apply_threads(model.threads)
    backend = load_hf_policy(
        model.name, dtype=model.dtype, device=model.device, temperature=rollout.temperature, top_p=rollout.top_p,
        seed=rollout.seed, kv_cache=rollout.kv_cache,
    )
    backend.threads = threads  # type: ignore[attr-defined]
    return backend


def _build_vllm(model: ModelConfig, rollout: RolloutConfig) -> PolicyBackend:
    from medrwr.rollout.backends.vllm import VLLMBackend
    from medrwr.rollout.constrain import resolve_constrain

    apply_threads(model.threads)
    return VLLMBackend.load(
        model.name, dtype=model.dtype, temperature=rollout.temperature, top_p=rollout.top_p, seed=rollout.seed,
        constrained=resolve_constrain(model, rollout) != "none",
    )


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("hf", _build_hf, "models", True,
                    "transformers on CPU or GPU, KV cache kept across turns; also .gguf files and the packaged SmolLM2"),
        BackendSpec("vllm", _build_vllm, "vllm", True, "vLLM on GPUs, prefix caching across turns"),
    )
}


def backend_spec(name: str) -> BackendSpec:
    """The spec registered under ``name``; :class:`~medrwr.errors.ConfigError` listing the valid names otherwise.

    >>> backend_spec("hf").extra
    'models'
    >>> backend_spec("tgi")
    Traceback (most recent call last):
    ...
    medrwr.errors.ConfigError: unknown policy backend 'tgi' (model.backend); choose one of: hf, vllm
    """
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown policy backend {name!r} (model.backend); choose one of: {', '.join(BACKENDS)}"
        ) from None


def build_backend(model: ModelConfig, rollout: RolloutConfig) -> PolicyBackend:
    """The policy named by ``model`` (hub id, local path, ``.gguf``; None = packaged SmolLM2) on its backend."""
    return backend_spec(model.backend).factory(model, rollout)


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
