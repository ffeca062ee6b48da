"""The vLLM backend (GPU, the ``vllm`` extra): token-id prompts with multimodal data, stop strings kept.

Each turn is one ``LLM.generate`` call over the rows still running, with
``SamplingParams(stop=[...], include_stop_str_in_output=True, logprobs=N, max_tokens=budget)`` per row and
prompts ``{"prompt_token_ids": ids, "multi_modal_data": {"image": [...]}}``. vLLM keeps the generated token ids
whole (it cuts only the *text* at a stop string), so the ids stay exactly as sampled; prefix caching makes the
re-fed prefix of every later turn cheap.

vLLM reports the top-N log-probabilities per position (plus the sampled token's), not arbitrary ids, so option
letters outside the top-N read as impossible; ``logprobs=20`` (vLLM's default cap) covers them in practice.

Constrained decoding (``constraints=``, :mod:`medrwr.rollout.constrain`): each constrained row's turn grammar
goes into ``SamplingParams(structured_outputs=StructuredOutputsParams(grammar=<lark text>))``, which vLLM 0.31
applies with llguidance (``LLM(structured_outputs_config={"backend": "guidance"})``, set by ``load(constrained=
True)``), the same library and grammar text as the transformers backend. vLLM computes log-probabilities after
its grammar mask, so they are renormalised over the allowed tokens (``constrained_logprobs = "masked"``).

Untested on the CPU build machine; ``tests/test_rollout_vllm.py`` runs it where a CUDA GPU and vllm exist.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from medrwr.rollout.backends.base import (
    BackendError,
    Continuation,
    FinishReason,
    GenerationState,
    per_row_budgets,
)
from medrwr.rollout.backends.processing import RawImagePrompts

logger = logging.getLogger(__name__)

__all__ = ["VLLMBackend"]


class VLLMBackend(RawImagePrompts):
    """A ``vllm.LLM`` behind the :class:`PolicyBackend` interface; the processor renders prompts and images."""

    supports_constraints = True
    constrained_logprobs = "masked"

    def __init__(
        self,
        llm: Any,
        processor: Any,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        logprobs: int = 20,
        eos_token_ids: Sequence[int] | None = None,
    ):
        self.llm = llm
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None) or processor
        self.image_processor = getattr(processor, "image_processor", None)
        self.supports_images = self.image_processor is not None
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.logprobs = max(1, int(logprobs))
        eos = set(eos_token_ids or [])
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        if not eos:
            raise BackendError("no end-of-sequence token id known for this model")
        self._eos = eos
        self._calls = 0

    @classmethod
    def load(cls, name_or_path: str | None, *, dtype: str = "auto", temperature: float = 1.0, top_p: float = 1.0,
             seed: int | None = None, max_images: int = 4, constrained: bool = False,
             **llm_kwargs: Any) -> VLLMBackend:
        """``vllm.LLM(model, dtype, enable_prefix_caching=True, limit_mm_per_prompt={"image": max_images})``;
        ``constrained`` selects vLLM's ``guidance`` (llguidance) structured-output backend for the turn grammars."""
        from medrwr._imports import require

        vllm = require("vllm", "vllm", "the vLLM policy backend")
        if name_or_path is None:
            raise BackendError("the vLLM backend needs --model (a hub id or local checkpoint)")
        from medrwr.rollout.backends.processing import load_processor

        llm_kwargs.setdefault("enable_prefix_caching", True)
        llm_kwargs.setdefault("limit_mm_per_prompt", {"image": max_images})
        if constrained:
            llm_kwargs.setdefault("structured_outputs_config", {"backend": "guidance"})
        llm = vllm.LLM(model=str(name_or_path), dtype=dtype, seed=seed or 0, **llm_kwargs)
        processor = load_processor(name_or_path)
        gc_eos = None
        try:
            gc = llm.llm_engine.model_config.hf_config
            gc_eos = getattr(gc, "eos_token_id", None)
        except AttributeError:
            pass
        eos = gc_eos if isinstance(gc_eos, (list, tuple)) else ([gc_eos] if gc_eos is not None else [])
        return cls(llm, processor, temperature=temperature, top_p=top_p, seed=seed, eos_token_ids=eos)

    @staticmethod
    def _structured(grammar: Any) -> dict[str, Any]:
        """The SamplingParams keyword carrying one turn grammar (vLLM >= 0.12 names; older GuidedDecodingParams)."""
        try:
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError:  # pragma: no cover - vLLM < 0.12
            from vllm.sampling_params import GuidedDecodingParams

            return {"guided_decoding": GuidedDecodingParams(grammar=grammar.lark)}
        return {"structured_outputs": StructuredOutputsParams(grammar=grammar.lark)}

    def _params(self, stop: Sequence[str], budget: int, seed: int | None, grammar: Any = None):
        import vllm

        kwargs: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": -1,
            "max_tokens": budget,
            "stop": list(stop),
            "include_stop_str_in_output": True,
            "stop_token_ids": sorted(self._eos),
            "logprobs": self.logprobs,
            "skip_special_tokens": False,
        }
        if seed is not None:
            kwargs["seed"] = seed
        if grammar is not None:
            kwargs.update(self._structured(grammar))
        return vllm.SamplingParams(**kwargs)

    def generate(
        self,
        states: Sequence[GenerationState],
        stop: Sequence[str],
        max_new_tokens: int | Sequence[int],
        *,
        watch_token_ids: Sequence[int] = (),
        top_logprobs: int = 0,
        constraints: Sequence[Any] | None = None,
    ) -> list[Continuation]:
        import numpy as np

        budgets = per_row_budgets(max_new_tokens, len(states))
        grammars = list(constraints) if constraints is not None else [None] * len(states)
        if len(grammars) != len(states):
            raise BackendError(f"constraints has {len(grammars)} entries for {len(states)} states")
        prompts, params = [], []
        for row, (s, b) in enumerate(zip(states, budgets)):
            p: dict[str, Any] = {"prompt_token_ids": list(s.ids)}
            if s.mm and s.mm.data.get("image"):
                p["multi_modal_data"] = {"image": list(s.mm.data["image"])}
            prompts.append(p)
            # One seed per row and call: GRPO repeats each prompt num_generations times, and a shared seed
            # would give every copy the same completion (zero advantage).
            seed = None if self.seed is None else self.seed + self._calls * len(states) + row
            params.append(self._params(stop, max(b, 1), seed, grammars[row]))
        self._calls += 1
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        result = []
        for out, budget in zip(outs, budgets):
            o = out.outputs[0]
            ids = [int(t) for t in o.token_ids][:budget]
            dists = list(o.logprobs or [])[: len(ids)]
            if len(dists) != len(ids):
                raise BackendError(f"vLLM returned {len(dists)} log-probability entries for {len(ids)} tokens")
            lps = [float(d[t].logprob) for t, d in zip(ids, dists)]
            n_top = max(len(d) for d in dists) if dists else 0
            top_ids = np.zeros((len(ids), n_top), dtype=np.int64)
            top_lp = np.full((len(ids), n_top), -math.inf, dtype=np.float32)
            for i, d in enumerate(dists):
                for j, (tid, lp) in enumerate(d.items()):
                    top_ids[i, j], top_lp[i, j] = int(tid), float(lp.logprob)
            reason: FinishReason
            stop_string = None
            if o.finish_reason == "stop" and isinstance(o.stop_reason, str):
                reason, stop_string = "stop", o.stop_reason
            elif o.finish_reason == "stop":
                reason = "eos"
            else:
                reason = "length"
            result.append(Continuation(ids, lps, reason, stop_string, top_ids=top_ids, top_logprobs=top_lp))
        return result
