"""KV-cache reuse across turns (medrwr.rollout.backends.kv_cache): the cached path must give the same token ids
and log-probabilities as the uncached one (the reference), on batched multi-round rollouts where rows finish at
different turns, and fall back to a fresh prefill where a row's ids no longer extend what was cached.

Everything is real: the tiny Qwen2 text model on the real Qwen vocabulary, transformers generate, the engine,
stop strings, a retriever. Random models never write tags, so ForcedTranscript scripts the tags and FREE holes
let the model sample its own tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from medrwr.config import RolloutConfig
from medrwr.errors import BackendError, ConfigError
from medrwr.retrieval.base import FakeRetriever
from medrwr.rollout.backends.base import GenerationState
from medrwr.rollout.backends.hf import HFBackend
from medrwr.rollout.backends.kv_cache import resolve_kv_cache, supports_reuse
from medrwr.rollout.engine import RolloutEngine, RolloutRequest
from medrwr.testing import FREE, ForcedTranscript

DOCS = {
    "d1": "Lobar pneumonia shows consolidation with air bronchograms.",
    "d2": "A pneumothorax shows a visceral pleural line.",
}
TOL = 5e-6
"""Log-prob tolerance. Observed: <= 1e-6 (fp32 rounding). The tiny random model is insensitive: zeroing every cached
key moves its log-probs by only ~1e-3 and scaling them by 1.01 by ~1e-5, so 1e-4 would not catch a wrong cache."""
QUESTIONS = ["Short?", "A much longer question text here, with more words?", "Mid one?", "x?"]


@pytest.fixture(scope="module")
def text_lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from medrwr.rollout.backends.processing import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval(), load_tokenizer(tiny_lm_dir)


def _scripts(tok):
    """Rows that end after 1, 2, 3 and 0 retrievals; FREE holes are sampled by the model itself."""
    letters = [tok.convert_tokens_to_ids(c) for c in "ABC"]
    return [
        [["<think>", FREE(5), "</think>\n<query>pneumonia consolidation</query>\n"]],
        [["<think>", FREE(3), "</think><query>pleural line</query>"],
         ["<think>", FREE(4), "</think>\n<answer>", FREE(1, letters), "</answer>"]],
        [["<think>", FREE(2), "</think><query>air</query>"],
         ["<think>", FREE(6), "</think><query>pneumothorax</query>"],
         ["<think>", FREE(3), "</think><query>lobar</query>"],
         ["<answer>", FREE(1, letters), "</answer>"]],
        [["<answer>", FREE(1, letters), "</answer>"]],
    ]


def _rollouts(model, tok, kv_cache, temperature):
    backend = HFBackend(model, tok, logits_processors=[ForcedTranscript(tok, rows=_scripts(tok))], seed=7,
                        temperature=temperature, top_logprobs=3, kv_cache=kv_cache)
    engine = RolloutEngine(backend, FakeRetriever(DOCS), RolloutConfig(max_rounds=3, temperature=temperature))
    return engine.run([RolloutRequest(q, ["a", "b", "c"]) for q in QUESTIONS]), backend


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_cached_rollouts_equal_uncached(text_lm, temperature):
    model, tok = text_lm
    ref, plain = _rollouts(model, tok, "off", temperature)
    got, cached = _rollouts(model, tok, "on", temperature)
    assert plain.kv_cache is None
    assert cached.kv_cache.reused_tokens > 200  # turns 2+ really continued from kept keys/values
    assert sorted(t.rounds for t in got) == [0, 1, 1, 3]  # rows leave the batch after turns 1, 2, 2 and 4
    for a, b in zip(ref, got):
        b.check()
        assert b.completion_ids == a.completion_ids
        assert b.completion_mask == a.completion_mask
        assert np.allclose(b.logprobs, a.logprobs, atol=TOL, rtol=0)
        assert b.stop_reason == a.stop_reason and b.answer == a.answer


def test_same_forced_ids_give_the_same_logprobs_and_top_n(text_lm):
    """Direct backend calls: one row continues its cached turn, one starts fresh, in one middle-padded batch."""
    model, tok = text_lm
    p1 = tok.encode("<|im_start|>user\nWhat shows a pleural line?<|im_end|>\n<|im_start|>assistant\n")
    p2 = tok.encode("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")
    inserted = tok.encode("\n<retrieve>(1) A pneumothorax shows a visceral pleural line.</retrieve>\n")
    outs = {}
    for mode in ("off", "on"):
        backend = HFBackend(model, tok, temperature=0, top_logprobs=4, kv_cache=mode)
        first = backend.generate([GenerationState(p1)], ["</query>"], 9)[0]
        second = backend.generate([GenerationState(p1 + first.token_ids + inserted), GenerationState(p2)],
                                  ["</query>"], [7, 5])
        outs[mode] = (first, second, backend)
    (f0, s0, _), (f1, s1, cached) = outs["off"], outs["on"]
    shared = len(tok.encode("<|im_start|>user\n"))  # p2 shares its opening with row 1's kept key
    assert cached.kv_cache.reused_tokens == len(p1) + len(f1.token_ids) - 1 + shared
    assert f1.token_ids == f0.token_ids
    for a, b in zip(s0, s1):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert np.allclose(b.logprobs, a.logprobs, atol=TOL, rtol=0)
        assert np.array_equal(b.top_ids, a.top_ids)
        assert np.allclose(b.top_logprobs, a.top_logprobs, atol=TOL, rtol=0)


def test_ids_that_diverge_from_a_kept_key_reuse_only_the_shared_prefix(text_lm):
    model, tok = text_lm
    prompt = tok.encode("<|im_start|>user\nHow does consolidation look?<|im_end|>\n<|im_start|>assistant\n")
    other = tok.encode("Lobar pneumonia.")
    ref = HFBackend(model, tok, temperature=0, kv_cache="off")
    backend = HFBackend(model, tok, temperature=0, kv_cache="on")
    out = backend.generate([GenerationState(prompt)], [], 6)[0]
    assert len(backend.kv_cache.entries) == 1
    truncated = prompt[:-2] + other  # diverges before the end of the kept key: only the common part is reused
    got = backend.generate([GenerationState(truncated)], [], 6)[0]
    assert backend.kv_cache.reused_tokens == len(prompt) - 2
    want = ref.generate([GenerationState(truncated)], [], 6)[0]
    assert got.token_ids == want.token_ids and np.allclose(got.logprobs, want.logprobs, atol=TOL, rtol=0)
    before = backend.kv_cache.reused_tokens
    unrelated = tok.encode("Lobar pneumonia shows consolidation.")  # shares nothing: a fresh prefill
    got = backend.generate([GenerationState(unrelated)], [], 4)[0]
    assert backend.kv_cache.reused_tokens == before
    want = ref.generate([GenerationState(unrelated)], [], 4)[0]
    assert got.token_ids == want.token_ids and np.allclose(got.logprobs, want.logprobs, atol=TOL, rtol=0)
    shorter = prompt + out.token_ids[:2]  # a prefix of a kept key: all but its last token come from the cache
    before = backend.kv_cache.reused_tokens
    got = backend.generate([GenerationState(shorter)], [], 4)[0]
    assert backend.kv_cache.reused_tokens - before == len(shorter) - 1
    want = ref.generate([GenerationState(shorter)], [], 4)[0]
    assert got.token_ids == want.token_ids and np.allclose(got.logprobs, want.logprobs, atol=TOL, rtol=0)


def test_a_cold_batch_prefills_its_shared_system_prompt_once(text_lm):
    """Rows sharing a long prefix (the system prompt) reuse one single-row prefill of it; results are unchanged."""
    model, tok = text_lm
    system = "<|im_start|>system\nYou are a careful radiologist. Search before answering when unsure.<|im_end|>\n"
    prompts = [tok.encode(system + f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
               for q in QUESTIONS]
    shared = len(tok.encode(system + "<|im_start|>user\n"))
    ref = HFBackend(model, tok, temperature=0, top_logprobs=2, kv_cache="off")
    backend = HFBackend(model, tok, temperature=0, top_logprobs=2, kv_cache="on")
    want = ref.generate([GenerationState(p) for p in prompts], [], 5)
    got = backend.generate([GenerationState(p) for p in prompts], [], 5)
    assert backend.kv_cache.shared_prefills == 1
    assert backend.kv_cache.reused_tokens >= len(prompts) * (shared - 1)
    for a, b in zip(want, got):
        assert b.token_ids == a.token_ids
        assert np.allclose(b.logprobs, a.logprobs, atol=TOL, rtol=0)
        assert np.allclose(b.top_logprobs, a.top_logprobs, atol=TOL, rtol=0)
    again = backend.generate([GenerationState(p) for p in prompts], [], 5)  # warm: no second shared prefill
    assert backend.kv_cache.shared_prefills == 1 and [c.token_ids for c in again] == [c.token_ids for c in want]


def test_store_is_capped_and_dropped_when_weights_change(text_lm):
    model, tok = text_lm
    prompts = [tok.encode(f"<|im_start|>user\nquestion number {i}<|im_end|>\n") for i in range(4)]
    backend = HFBackend(model, tok, temperature=0, kv_cache="on")
    backend.kv_cache.max_tokens = 2 * max(len(p) for p in prompts) + 8
    backend.generate([GenerationState(p) for p in prompts], [], 4)
    assert 0 < backend.kv_cache.tokens <= backend.kv_cache.max_tokens and len(backend.kv_cache.entries) < 4
    kept = next(iter(backend.kv_cache.entries))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        model(torch.tensor([prompts[0]])).logits.sum().backward()
        opt.step()  # an optimizer step (here a no-op) modifies the weights in place: kept keys are stale
        model.zero_grad(set_to_none=True)
        backend.generate([GenerationState(list(kept) + [11])], [], 2)
        assert backend.kv_cache.reused_tokens == 0
    finally:
        model.load_state_dict(weights)


def test_mode_is_checked_and_vlms_keep_the_uncached_path(text_lm, tiny_vlm_dir):
    """Qwen2.5-VL reuses the cache (tests/rollout/test_kv_cache_vl.py); other VLMs keep the uncached path."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    model, _ = text_lm
    assert supports_reuse(model) == (True, "")
    with pytest.raises(ConfigError, match="rollout.kv_cache must be auto, on or off"):
        RolloutConfig(kv_cache="yes")
    with pytest.raises(BackendError, match="kv_cache must be auto, on or off"):
        resolve_kv_cache(model, "always", 0)
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm_dir).eval()
    assert supports_reuse(vlm) == (True, "")
    assert resolve_kv_cache(vlm, "auto", 0).vl is not None
    text = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "bos_token_id": 0, "eos_token_id": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}}
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": 16, "num_heads": 2, "mlp_ratio": 2}
    qwen2_vl = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision)).eval()
    assert resolve_kv_cache(qwen2_vl, "auto", 0) is None
    with pytest.raises(BackendError, match="vision-language model type 'qwen2_vl'"):
        resolve_kv_cache(qwen2_vl, "on", 0)


def test_rows_of_unequal_length_are_prefilled_alone_then_decoded_together(text_lm):
    """A short and a long prompt: each is prefilled on its own (no padding computed), the batch decodes together,
    and ids, log-probs and top-n equal the uncached path's; the own prefills are not counted as reuse."""
    model, tok = text_lm
    long_q = "Describe " + " ".join(["the pleural line and the lung markings"] * 12) + "?"
    prompts = [tok.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n") for q in ("Q?", long_q)]
    ref = HFBackend(model, tok, temperature=0, top_logprobs=3, kv_cache="off")
    backend = HFBackend(model, tok, temperature=0, top_logprobs=3, kv_cache="on")
    want = ref.generate([GenerationState(p) for p in prompts], [], 6)
    got = backend.generate([GenerationState(p) for p in prompts], [], 6)
    assert backend.kv_cache.row_prefills == 2
    assert backend.kv_cache.reused_tokens == 0  # nothing was in the store; own prefills are not reuse
    for a, b in zip(want, got):
        assert b.token_ids == a.token_ids
        assert np.allclose(b.logprobs, a.logprobs, atol=TOL, rtol=0)
        assert np.array_equal(b.top_ids, a.top_ids)
        assert np.allclose(b.top_logprobs, a.top_logprobs, atol=TOL, rtol=0)
    same = backend.generate([GenerationState(p) for p in (prompts[0], prompts[0])], [], 3)  # equal rows: batched
    assert backend.kv_cache.row_prefills == 2 and same[0].token_ids == same[1].token_ids


def test_long_rows_of_near_equal_length_are_prefilled_alone_on_a_cpu(text_lm):
    """Two long prompts 30% apart: a padded batch computes more than the rows alone plus one forward's fixed cost
    each, so on a CPU each is prefilled alone (old rule: only below 75% fill); two short equal prompts stay batched.
    Outputs equal the uncached path's either way."""
    from medrwr.rollout.backends.kv_cache import ROW_PREFILL_OVERHEAD_CPU, SHARED_PREFIX_MIN

    model, tok = text_lm
    body = " ".join(["the pleural line and the lung markings"] * 14)
    qs = (f"Describe {body}?", f"Explain {body}" + " and the heart borders" * 12 + "?")
    prompts = [tok.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n") for q in qs]
    shared = next(i for i, (a, b) in enumerate(zip(*prompts)) if a != b)
    assert shared < SHARED_PREFIX_MIN  # no shared-prefix prefill first: each row's whole prompt is to do
    todo = [len(p) - 1 for p in prompts]
    assert sum(todo) >= 0.75 * 2 * max(todo)  # the old rule would have padded
    assert sum(t + ROW_PREFILL_OVERHEAD_CPU for t in todo) < 2 * max(todo)
    ref = HFBackend(model, tok, temperature=0, top_logprobs=3, kv_cache="off")
    backend = HFBackend(model, tok, temperature=0, top_logprobs=3, kv_cache="on")
    want = ref.generate([GenerationState(p) for p in prompts], [], 5)
    got = backend.generate([GenerationState(p) for p in prompts], [], 5)
    assert backend.kv_cache.row_prefills == 2
    for a, b in zip(want, got):
        assert b.token_ids == a.token_ids
        assert np.allclose(b.logprobs, a.logprobs, atol=TOL, rtol=0)


def test_cpu_cost_model_prefers_rows_alone_for_large_padded_batches():
    """32 rows of 225-245 tokens: padding adds ~4% tokens, less than the rows' fixed costs, but a 7,800-token
    padded forward runs slower per token (measured: alone 20.0 s, padded 24.2 s), so they go alone; 4 such rows
    (one fast padded forward) and short rows (fixed cost dominates) stay batched; a GPU keeps its waste rule."""
    from medrwr.rollout.backends.kv_cache import ROW_PREFILL_OVERHEAD_CPU, rows_alone_cheaper

    rng = np.random.default_rng(0)
    todo = [int(x) for x in rng.integers(225, 246, size=32)]
    assert sum(m + ROW_PREFILL_OVERHEAD_CPU for m in todo) >= len(todo) * max(todo)  # token count alone: batch
    assert rows_alone_cheaper(todo, "cpu")
    assert not rows_alone_cheaper([236, 240, 238, 244], "cpu")
    assert not rows_alone_cheaper([20, 30, 24, 28], "cpu")
    assert rows_alone_cheaper([20, 400], "cpu") and rows_alone_cheaper([20, 400], "cuda")
    assert not rows_alone_cheaper(todo, "cuda")  # a GPU: only when padding is >= 25% of the batch
    assert not rows_alone_cheaper([400], "cpu") and not rows_alone_cheaper([4, 7], "cpu")


def test_growing_layers_append_in_place_and_equal_concatenation(text_lm):
    """The batch cache's layers write each step into a buffer with headroom (no whole-cache copy per step) and
    hold exactly what DynamicLayer's concatenation holds, also after crop / batch selection."""
    from medrwr.rollout.backends.kv_cache import growing_cache

    g = torch.Generator().manual_seed(0)
    states = [(torch.randn(2, 2, n, 4, generator=g), torch.randn(2, 2, n, 4, generator=g)) for n in (5, 1, 1, 1)]
    cache = growing_cache(text_lm[0].config)
    layer = cache.layers[0]
    layer.update(*states[0])
    ptr = layer.keys.data_ptr()
    for k, v in states[1:]:
        keys, values = layer.update(k, v)
    assert keys.data_ptr() == ptr  # the same buffer: no reallocation, no concatenation
    assert torch.equal(keys, torch.cat([s[0] for s in states], dim=-2))
    assert torch.equal(values, torch.cat([s[1] for s in states], dim=-2))
    big = torch.randn(2, 2, 300, 4, generator=g)  # past the headroom: the buffer grows, contents kept
    keys, _ = layer.update(big, big)
    assert keys.shape[-2] == 308 and torch.equal(keys[..., 8:, :], big) and torch.equal(keys[..., :5, :], states[0][0])
    layer.batch_select_indices(torch.tensor([1]))
    keys, _ = layer.update(states[1][0][:1], states[1][1][:1])
    assert keys.shape == (1, 2, 309, 4) and torch.equal(keys[0, :, -1], states[1][0][0, :, 0])
    assert cache.get_seq_length() == 309
    fresh = growing_cache(text_lm[0].config).layers[0]  # a batch assembled from kept entries: written in place
    fresh.reserve(states[0][0], states[0][1], 3, 7)
    assert fresh.keys.shape == (3, 2, 7, 4) and not fresh.keys.any() and fresh.get_seq_length() == 7
    fresh.keys[1, :, 2:7] = states[0][0][0]
    keys, _ = fresh.update(states[1][0][:1].expand(3, -1, -1, -1), states[1][1][:1].expand(3, -1, -1, -1))
    assert keys.data_ptr() == fresh._buffers[0].data_ptr() and torch.equal(keys[1, :, 2:7], states[0][0][0])
