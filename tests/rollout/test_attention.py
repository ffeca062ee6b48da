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


def test_half_precision_attention_runs_in_float32_on_the_cpu():
    """bfloat16 weights (``model.dtype: bfloat16``, fast matmuls on CPUs with native bf16) keep float32 attention:
    the output is float32 attention of the same inputs, returned in bfloat16 (CPU half-precision attention is 4-5x
    slower and less exact)."""
    import torch

    from medrwr.rollout.backends.attention import grouped_sdpa_attention

    class Module:
        is_causal = True

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g).bfloat16()
    k, v = (torch.randn(2, 2, 5, 8, generator=g).bfloat16() for _ in range(2))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[1, :, :, 0] = False  # a left-padded row
    out, _ = grouped_sdpa_attention(Module(), q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                           enable_gqa=True).transpose(1, 2)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 4, 8)
    assert torch.equal(out, ref.bfloat16())
    half = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    assert not torch.equal(half, ref.bfloat16())  # bf16 math differs: the float32 path is what was tested
