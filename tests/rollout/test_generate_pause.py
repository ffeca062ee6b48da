"""A greedy batch whose rows mostly finished continues its stragglers in a smaller call (HFBackend.generate):
the outputs equal one uninterrupted call's, grammar state and stop-string search carry over the pause."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llguidance")

from medrwr.rollout.backends.base import GenerationState
from medrwr.rollout.backends.hf import HFBackend
from medrwr.rollout.backends.hf_steps import Stops
from medrwr.rollout.constrain import turn_grammar

TOL = 5e-6
OPTS = {"A": "pleural effusion", "B": "pneumothorax", "C": "consolidation"}


@pytest.fixture(scope="module")
def text_lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from medrwr.rollout.backends.processing import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval(), load_tokenizer(tiny_lm_dir)


def _prompts(tok, n):
    return [tok.encode(f"<|im_start|>user\nCase {i}: which finding on the film?<|im_end|>\n<|im_start|>assistant\n")
            for i in range(n)]


def _generate(backend, tok, budgets, constrained):
    grammars = None
    if constrained:
        g = turn_grammar("ABC", OPTS, allow_query=True, budget=64, max_think_tokens=24, max_query_tokens=8)
        grammars = [g] * len(budgets)
    seen: list[tuple[int, int]] = []
    outs = backend.generate([GenerationState(p) for p in _prompts(tok, len(budgets))], ["</query>"], budgets,
                            top_logprobs=3, constraints=grammars, on_token=lambda b, t: seen.append((b, t)) and False)
    return outs, seen


@pytest.mark.parametrize("constrained", [False, True])
def test_paused_stragglers_give_one_calls_outputs(text_lm, constrained):
    model, tok = text_lm
    budgets = [2] * 6 + [48, 40]  # after two steps 6 of 8 rows are done: the other two go on in a call of two
    one = HFBackend(model, tok, temperature=0, top_logprobs=3, kv_cache="off")
    paused = HFBackend(model, tok, temperature=0, top_logprobs=3, kv_cache="on")
    want, seen_one = _generate(one, tok, budgets, constrained)
    got, seen = _generate(paused, tok, budgets, constrained)
    assert one.forward_calls == 1 and paused.forward_calls == 2  # the pause really happened
    assert len(got[7].token_ids) > 2  # the stragglers continued past the pause
    for a, b in zip(want, got):
        assert b.token_ids == a.token_ids
        assert b.finish_reason == a.finish_reason and b.stop_string == a.stop_string
        assert np.allclose(b.logprobs, a.logprobs, atol=TOL, rtol=0)
        assert np.array_equal(b.top_ids, a.top_ids)
        assert np.allclose(b.top_logprobs, a.top_logprobs, atol=TOL, rtol=0)
    # every row's tokens reached the callback under the row's own index, in order
    assert sorted(seen) == sorted(seen_one)
    for b in range(len(budgets)):
        assert [t for r, t in seen if r == b] == got[b].token_ids


def test_no_pause_when_sampling_or_small_or_without_the_store(text_lm):
    model, tok = text_lm
    budgets = [2] * 6 + [48, 40]
    for backend in (HFBackend(model, tok, temperature=1.0, seed=0, kv_cache="on"),  # sampling: the stream must stay
                    HFBackend(model, tok, temperature=0, kv_cache="off")):
        backend.generate([GenerationState(p) for p in _prompts(tok, 8)], [], budgets)
        assert backend.forward_calls == 1
    small = HFBackend(model, tok, temperature=0, kv_cache="on")
    small.generate([GenerationState(p) for p in _prompts(tok, 3)], [], [2, 2, 40])  # fewer than four rows
    assert small.forward_calls == 1


def test_a_stop_string_spanning_the_pause_is_found(text_lm):
    _, tok = text_lm
    head = tok.encode("I will search. <query>goiter</qu", add_special_tokens=False)
    tail = tok.encode("ery> more", add_special_tokens=False)
    prompt = [7, 8, 9]

    def run(prefix):
        stops = Stops(tok, ["</query>"], len(prompt), [10], {0}, prefix=prefix)
        for step in range(1, len(tail) + 1):
            stops(torch.tensor([prompt + tail[:step]]), None)
        return stops

    found = run([head])
    assert found.reason[0] == "stop" and found.stop_string[0] == "</query>"
    assert tok.decode(head + tail[: found.length[0]]).endswith("</query>")
    missed = run(None)  # without the earlier tokens the closing tag is not there
    assert missed.reason[0] == "length" and missed.length[0] is None


def test_paused_rows_are_the_last_the_size_cap_evicts(text_lm):
    """A store with room for two rows: the two paused rows (first in the batch) keep their keys over the six
    that finished, so the smaller call continues them from the store instead of prefilling them again."""
    model, tok = text_lm
    budgets = [48, 40] + [2] * 6
    prompts = _prompts(tok, len(budgets))
    backend = HFBackend(model, tok, temperature=0, kv_cache="on")
    backend.kv_cache.max_tokens = 2 * (max(len(p) for p in prompts) + 1) + 2
    want = HFBackend(model, tok, temperature=0, kv_cache="off").generate(
        [GenerationState(p) for p in prompts], [], budgets)
    got = backend.generate([GenerationState(p) for p in prompts], [], budgets)
    assert backend.forward_calls == 2
    assert backend.kv_cache.reused_tokens >= sum(len(p) for p in prompts[:2])  # continued, not prefilled again
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
