"""Grammar-constrained decoding (rollout.constrain: protocol, medrwr.rollout.constrain) on llguidance.

Grammar checks run llguidance's matcher on the real Qwen2.5 tokenizer (fast). The property tests roll out tiny
random models (real Qwen vocabulary, random weights: left alone they never write a tag) with sampling over
many seeds and prompts: every constrained trace must be grammar-valid, the model must still choose between
searching and answering on its own (both happen), and answers must name one of the question's options.
SmolLM2 (the packaged demo policy) is checked under ``slow``.
"""

from __future__ import annotations

import math

import pytest

from medrwr import protocol
from medrwr.config import ModelConfig, RolloutConfig, load_config
from medrwr.errors import ConfigError, ConstraintError
from medrwr.retrieval.base import FakeRetriever
from medrwr.rollout.backends.base import ScriptedBackend
from medrwr.rollout.backends.registry import resolve_threads
from medrwr.rollout.engine import RolloutEngine, RolloutRequest
from medrwr.rollout.trace import RolloutTrace, render_trace

pytest.importorskip("llguidance")

from medrwr.rollout.constrain import (
    ll_tokenizer,
    new_matcher,
    protocol_grammar,
    resolve_constrain,
    turn_grammar,
)

DOCS = {
    "d1": "Lobar pneumonia shows consolidation with air bronchograms on chest radiographs.",
    "d2": "Pneumothorax shows a visceral pleural line without lung markings beyond it.",
    "d3": "Pleural effusion blunts the costophrenic angle on an upright film.",
    "d4": "Pulmonary edema shows perihilar opacities and Kerley B lines.",
}
OPTIONS = ["pleural effusion", "lobar pneumonia", "pneumothorax", "pulmonary edema", "atelectasis"]


# ---------------------------------------------------------------------- config


def test_constrain_default_is_on_only_for_the_packaged_demo_policy():
    assert RolloutConfig().constrain == "auto"
    assert resolve_constrain(ModelConfig(), RolloutConfig()) == "protocol"
    assert resolve_constrain(ModelConfig(name="some/model"), RolloutConfig()) == "none"
    assert resolve_constrain(ModelConfig(), RolloutConfig(constrain="none")) == "none"
    assert resolve_constrain(ModelConfig(name="x"), RolloutConfig(constrain="protocol")) == "protocol"
    cfg = load_config(overrides=["rollout.constrain=none", "model.threads=3"])
    assert cfg.rollout.constrain == "none" and cfg.model.threads == 3
    with pytest.raises(ConfigError):
        load_config(overrides=["rollout.constrain=json"])
    with pytest.raises(ConfigError):
        ModelConfig(threads=0)


def test_thread_default(monkeypatch):
    import os

    assert resolve_threads(5) == 5
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert resolve_threads() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert resolve_threads() == 8
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert resolve_threads() == 3


# ---------------------------------------------------------------------- the grammar itself


@pytest.fixture(scope="module")
def ll(qwen_tokenizer):
    return ll_tokenizer(qwen_tokenizer, 151936)


def _accepts(tok, ll, grammar, text: str) -> bool:
    m = new_matcher(ll, grammar)
    ids = tok.encode(text, add_special_tokens=False)
    return m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids) and m.is_accepting()


OPTS = {"A": "effusion", "B": "pneumonia", "C": "pneumothorax"}


@pytest.mark.parametrize(
    "text, ok",
    [
        ("<think>Opacity.</think>\n<query>pneumonia consolidation</query>", True),
        ("\n<think>Fits.</think> <answer>B</answer>", True),
        ("<think>Fits.</think>\n<answer>B. pneumonia</answer>", True),
        ("<think>Fits.</think><answer>D</answer>", False),  # not an option
        ("<think>Fits.</think><answer>B. pneumothorax</answer>", False),  # B's text is pneumonia
        ("<think>Fits.</think><answer>b</answer>", False),
        ("<think> </think><answer>B</answer>", False),  # blank block
        ("<think>\n</think><answer>B</answer>", False),
        ("<think>a < b</think><answer>B</answer>", False),  # angle bracket in a model block
        ("<think>x</think><query> </query>", False),
        ("<think>x</think><query>a>b</query>", False),
        ("The answer is B.", False),  # prose
        ("<query>x</query>", False),  # no think first
        ("<think>x</think>hello<answer>B</answer>", False),  # text outside blocks
        ("<think>x</think><answer>B</answer><think>", False),  # nothing after the answer
    ],
)
def test_grammar_accepts_exactly_the_protocol(qwen_tokenizer, ll, text, ok):
    g = turn_grammar("ABC", OPTS, allow_query=True, budget=1024, max_think_tokens=256, max_query_tokens=48)
    assert _accepts(qwen_tokenizer, ll, g, text) is ok
    if ok:  # what the grammar accepts, the protocol parser accepts (closed with a retrieve block if a query)
        tail = protocol.format_retrieval(["doc"]) + "<think>x</think><answer>B</answer>" if "<query>" in text else ""
        assert protocol.parse_completion(text + ("\n" + tail if tail else "")).valid


def test_spent_search_budget_allows_only_an_answer(qwen_tokenizer, ll):
    g = turn_grammar("AB", None, allow_query=False, budget=256, max_think_tokens=64, max_query_tokens=16)
    assert not g.allow_query and "query" not in g.lark
    assert _accepts(qwen_tokenizer, ll, g, "<think>x</think><answer>A</answer>")
    assert not _accepts(qwen_tokenizer, ll, g, "<think>x</think><query>y</query>")


def test_free_text_answer_without_options(qwen_tokenizer, ll):
    g = turn_grammar("", None, allow_query=True, budget=256, max_think_tokens=64, max_query_tokens=16)
    assert _accepts(qwen_tokenizer, ll, g, "<think>x</think><answer>yes, it is</answer>")
    assert not _accepts(qwen_tokenizer, ll, g, "<think>x</think><answer> </answer>")


def test_text_bounds_fit_the_turn_budget():
    g = turn_grammar("ABCD", {"A": "x" * 30}, allow_query=True, budget=1024, max_think_tokens=256,
                     max_query_tokens=48)
    assert (g.max_think_tokens, g.max_query_tokens) == (256, 48)
    small = turn_grammar("ABCD", {"A": "x" * 30}, allow_query=True, budget=60, max_think_tokens=256,
                         max_query_tokens=48)
    assert small.max_think_tokens >= 8 and '"A. ' not in small.lark  # tight: bare letters, room to think
    assert small.max_think_tokens + max(small.max_query_tokens, 1) + 36 <= 60


def test_option_text_with_angle_brackets_is_not_offered():
    g = protocol_grammar("AB", {"A": "<5 mm", "B": "large"})
    assert '"A. <5 mm"' not in g and '"B. large"' in g and '"A"' in g


# ---------------------------------------------------------------------- the engine's side (scripted backend)


def test_engine_hands_each_row_its_turn_grammar(qwen_tokenizer):
    script = [
        "<think>Opacity.</think>\n<query>pneumonia consolidation</query>",
        "<think>Fits.</think>\n<answer>B</answer>",
    ]
    backend = ScriptedBackend(qwen_tokenizer, {"0": script})
    cfg = RolloutConfig(max_rounds=1, constrain="protocol")
    eng = RolloutEngine(backend, FakeRetriever(DOCS), cfg)
    (tr,) = eng.run([RolloutRequest("Which finding?", OPTS)])
    assert tr.valid and tr.constrained == "protocol" and tr.metadata["constrained_logprobs"] == "raw"
    grammars = [c[0]["constraint"] for c in backend.calls]
    assert [g.allow_query for g in grammars] == [True, False]  # the one search is spent after turn 1
    assert all(g.letters == "ABC" and '"B. pneumonia"' in g.lark for g in grammars)
    again = RolloutTrace.from_json(tr.to_json())
    assert again.constrained == "protocol"
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(render_trace(tr))
    assert "constrained to the protocol grammar" in console.export_text()


def test_unconstrained_engine_passes_no_grammar(qwen_tokenizer):
    backend = ScriptedBackend(qwen_tokenizer, {"0": "<think>x</think><answer>A</answer>"})
    (tr,) = RolloutEngine(backend, FakeRetriever(DOCS), RolloutConfig()).run([RolloutRequest("Q?", OPTS)])
    assert tr.constrained is None and backend.calls[0][0]["constraint"] is None  # "auto" alone = free


def test_backend_that_cannot_constrain_is_refused(qwen_tokenizer):
    class Plain(ScriptedBackend):
        supports_constraints = False

    with pytest.raises(ConstraintError, match="cannot constrain"):
        RolloutEngine(Plain(qwen_tokenizer, {}), None, RolloutConfig(constrain="protocol"))


# ---------------------------------------------------------------------- tiny models: property tests


@pytest.fixture(scope="module")
def text_lm(tiny_lm_dir):
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from medrwr.rollout.backends.processing import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval(), load_tokenizer(tiny_lm_dir)


def _requests(n: int, seed: int) -> list[RolloutRequest]:
    out = []
    for i in range(n):
        k = 2 + (seed + i) % 4
        opts = OPTIONS[:k] if (seed + i) % 3 else {L: o for L, o in zip("ABCDE", OPTIONS[:k])}
        out.append(RolloutRequest(f"Case {seed}-{i}: which finding?", opts))
    return out


def _check_trace(tr: RolloutTrace, letters: str, max_rounds: int) -> None:
    tr.check()
    assert tr.valid, (tr.metadata.get("invalid"), tr.completion_text)
    assert tr.stop_reason == "answer", (tr.stop_reason, tr.error)
    assert tr.constrained == "protocol"
    assert tr.choice is not None and tr.choice in letters, (tr.answer, letters)
    assert tr.rounds <= max_rounds and not tr.metadata.get("over_budget_queries")


def test_tiny_lm_constrained_traces_are_always_valid(text_lm):
    from medrwr.rollout.backends.hf import HFBackend

    model, tok = text_lm
    choices = {"query": 0, "answer_first": 0}
    for seed in range(12):
        cfg = RolloutConfig(
            max_rounds=seed % 3, max_new_tokens_per_turn=40 + 8 * (seed % 3), max_total_new_tokens=160,
            temperature=1.0, constrain="protocol", constrain_max_think_tokens=6, constrain_max_query_tokens=5,
        )
        backend = HFBackend(model, tok, temperature=1.0, seed=seed)
        reqs = _requests(3, seed)
        for req, tr in zip(reqs, RolloutEngine(backend, FakeRetriever(DOCS), cfg).run(reqs)):
            _check_trace(tr, req.option_letters(), cfg.max_rounds)
            if cfg.max_rounds:
                choices["query" if tr.rounds else "answer_first"] += 1
    assert choices["query"] > 0 and choices["answer_first"] > 0, choices  # the model's own choice, both ways


def test_tiny_lm_constrained_logprobs_are_the_models_own(text_lm):
    """The recorder reads the raw logits before the grammar mask: a teacher-forced forward gives the same."""
    import torch

    from medrwr.rollout.backends.hf import HFBackend

    model, tok = text_lm
    cfg = RolloutConfig(max_rounds=0, max_new_tokens_per_turn=48, temperature=1.0, constrain="protocol",
                        constrain_max_think_tokens=6)
    (tr,) = RolloutEngine(HFBackend(model, tok, temperature=1.0, seed=3), None, cfg).run(_requests(1, 0))
    assert tr.valid
    ids = torch.tensor([tr.prompt_ids + tr.completion_ids])
    with torch.inference_mode():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    n = len(tr.prompt_ids)
    expect = [float(logp[n + i - 1, t]) for i, t in enumerate(tr.completion_ids)]
    assert max(abs(a - b) for a, b in zip(expect, tr.logprobs)) < 1e-4
    assert min(tr.logprobs) < math.log(0.5)  # forced tag tokens are unlikely for a random model: raw, not masked


def test_tiny_vlm_constrained_with_images(tiny_vlm_dir):
    pytest.importorskip("torch")
    import numpy as np
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medrwr.rollout.backends.hf import HFBackend
    from medrwr.rollout.backends.processing import load_processor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm_dir).eval()
    backend = HFBackend(model, load_processor(tiny_vlm_dir), temperature=1.0, seed=1)
    img = Image.fromarray((np.random.RandomState(0).rand(56, 56, 3) * 255).astype("uint8"))
    cfg = RolloutConfig(max_rounds=1, max_new_tokens_per_turn=40, max_total_new_tokens=120, temperature=1.0,
                        constrain="protocol", constrain_max_think_tokens=5, constrain_max_query_tokens=4)
    reqs = [RolloutRequest("Which finding?", OPTIONS[:3], images=[img]) for _ in range(3)]
    for tr in RolloutEngine(backend, FakeRetriever(DOCS), cfg).run(reqs):
        _check_trace(tr, "ABC", 1)


# ---------------------------------------------------------------------- SmolLM2 (the packaged demo policy)


SMOL_QUESTIONS = [
        RolloutRequest("Which finding is typical of heart failure on a chest x-ray?",
                       ["Cardiomegaly", "Pneumothorax", "Rib fracture"]),
        RolloutRequest("Which drug is a loop diuretic?", ["Furosemide", "Metformin", "Atorvastatin", "Warfarin"]),
        RolloutRequest("Which term means an abnormally small head?", ["Macrocephaly", "Microcephaly"]),
        RolloutRequest("Which vitamin deficiency causes scurvy?", {"A": "Vitamin C", "B": "Vitamin D"}),
]


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from medrwr.rollout.backends.hf import load_hf_policy

    return load_hf_policy(None, seed=0)


@pytest.mark.slow
def test_smollm2_constrained_is_valid_and_searches(smollm2):
    cfg = RolloutConfig(max_rounds=1, max_new_tokens_per_turn=96, max_total_new_tokens=256, constrain="protocol",
                        constrain_max_think_tokens=32, constrain_max_query_tokens=16)
    traces = RolloutEngine(smollm2, FakeRetriever(DOCS), cfg).run(SMOL_QUESTIONS)
    for req, tr in zip(SMOL_QUESTIONS, traces):
        _check_trace(tr, req.option_letters(), 1)
    assert any(tr.rounds for tr in traces)


@pytest.mark.slow
def test_smollm2_constrained_sampling_is_always_valid(smollm2):
    """Sampled (temperature 1), several seeds, small budgets: never an invalid trace."""
    from medrwr.rollout.backends.hf import HFBackend

    rounds = []
    for seed in range(3):
        backend = HFBackend(smollm2.model, smollm2.tokenizer, temperature=1.0, seed=seed)
        cfg = RolloutConfig(max_rounds=1 + seed % 2, max_new_tokens_per_turn=56, max_total_new_tokens=160,
                            temperature=1.0, constrain="protocol", constrain_max_think_tokens=12,
                            constrain_max_query_tokens=8)
        for req, tr in zip(SMOL_QUESTIONS, RolloutEngine(backend, FakeRetriever(DOCS), cfg).run(SMOL_QUESTIONS)):
            _check_trace(tr, req.option_letters(), cfg.max_rounds)
            rounds.append(tr.rounds)
    assert any(rounds) and not all(rounds), rounds  # both choices occur


# ---------------------------------------------------------------------- the ask command's options


@pytest.mark.parametrize(
    "flags, constrain, threads",
    [([], "auto", None), (["--no-constrain"], "none", None), (["--constrain", "--threads", "2"], "protocol", 2)],
)
def test_ask_constrain_and_threads_flags(monkeypatch, capsys, flags, constrain, threads):
    import medrwr.rollout.engine as engine_mod
    from medrwr.cli import main
    from medrwr.errors import BackendError

    seen = {}

    def fake_engine(cfg, **kw):
        seen["cfg"] = cfg
        raise BackendError("stop here")

    monkeypatch.setattr(engine_mod, "engine_from_config", fake_engine)
    code = main(["ask", "Which finding?", "--option", "a", "--option", "b", *flags])
    assert code != 0 and "stop here" in capsys.readouterr().err
    assert seen["cfg"].rollout.constrain == constrain and seen["cfg"].model.threads == threads
