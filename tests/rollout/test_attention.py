"""Grouped-query sdpa without key/value copies (medrwr.rollout.backends.attention): same tokens and log-probs as
transformers' sdpa on a padded batch of the tiny GQA model (4 query heads, 2 key/value heads)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from medrwr.rollout.backends.attention import NAME, use_grouped_sdpa  # noqa: E402
from medrwr.rollout.backends.base import GenerationState  # noqa: E402
from medrwr.rollout.backends.hf import HFBackend  # noqa: E402


def test_grouped_sdpa_matches_sdpa_on_a_padded_gqa_batch(tiny_lm_dir, tiny_vlm_dir):
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration

    from medrwr.rollout.backends.processing import load_tokenizer

    tok = load_tokenizer(tiny_lm_dir)
    prompts = [tok.encode(t) for t in ("Short?", "A much longer question about the pleural line and markings?",
                                       "Mid-length question here?")]
    outs = []
    for grouped in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, attn_implementation="sdpa").eval()
        assert model.config.num_key_value_heads < model.config.num_attention_heads
        if grouped:
            assert use_grouped_sdpa(model) is model
        assert (model.config._attn_implementation == NAME) is grouped
        backend = HFBackend(model, tok, temperature=0, top_logprobs=3, kv_cache="off")
        outs.append(backend.generate([GenerationState(p) for p in prompts], [], 8))
    for a, b in zip(*outs):
        assert b.token_ids == a.token_ids
        assert np.allclose(b.logprobs, a.logprobs, atol=1e-6, rtol=0)
        assert np.allclose(b.top_logprobs, a.top_logprobs, atol=1e-6, rtol=0)
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm_dir).eval()
    assert use_grouped_sdpa(vlm).config._attn_implementation != NAME  # VLMs keep transformers' attention
