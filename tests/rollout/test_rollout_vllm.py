"""The vLLM backend: runs only where a CUDA GPU and vllm are installed; skipped otherwise, with the reason."""

from __future__ import annotations

import pytest

from medrwr._imports import is_available


def _has_cuda() -> bool:
    if not is_available("torch"):
        return False
    import torch

    return torch.cuda.is_available()


requires_vllm_gpu = pytest.mark.skipif(
    not (is_available("vllm") and _has_cuda()), reason="needs a CUDA GPU and vllm"
)


def test_vllm_backend_imports_lazily():
    """The module imports without vllm; choosing it without vllm names the extra to install."""
    import medrwr.rollout.backends.vllm as mod
    from medrwr.errors import MissingExtraError
    from medrwr.rollout.backends.registry import backend_spec

    spec = backend_spec("vllm")
    assert spec.extra == "vllm" and spec.supports_images
    if not is_available("vllm"):
        with pytest.raises(MissingExtraError, match=r"medrwr\[vllm\]"):
            mod.VLLMBackend.load("some/model")


@requires_vllm_gpu
@pytest.mark.gpu
def test_vllm_rollout_is_token_exact(tiny_lm_dir):
    from medrwr.retrieval.base import FakeRetriever
    from medrwr.rollout.backends.vllm import VLLMBackend
    from medrwr.rollout.engine import RolloutEngine, RolloutRequest

    backend = VLLMBackend.load(str(tiny_lm_dir), dtype="float32", temperature=1.0, seed=0,
                               gpu_memory_utilization=0.3, enforce_eager=True)
    engine = RolloutEngine(backend, FakeRetriever({"d": "pneumonia consolidation"}))
    traces = engine.run([RolloutRequest("Q?", ["a", "b"]) for _ in range(4)])
    for tr in traces:
        tr.check()
        assert len(tr.logprobs) == len(tr.completion_ids)
        assert all(lp <= 0.0 for lp, m in zip(tr.logprobs, tr.completion_mask) if m)
        # the stop reason agrees with what the trace holds
        assert tr.error is None and (tr.answer is not None) == (tr.stop_reason == "answer")
