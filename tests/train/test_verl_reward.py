"""verl's ``custom_reward_function`` (medrwr.train.verl_reward): the same reward values as the TRL path for the
same trace, stage 1 and stage 2 weights from our stage configs, one-line refusal of what verl cannot compute.
Needs no verl: it is a plain function of what verl passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "Which finding?\nA. fever\nB. rash\nC. cough"
SCRIPT = ["<think>need facts</think><query>fever rash</query>", "<think>read</think><answer>B</answer>"]


@pytest.fixture(scope="module")
def trace(qwen_tokenizer):
    """A real engine rollout: one retrieval, answer B (scripted policy, in-memory retriever)."""
    from medrwr.config import RolloutConfig
    from medrwr.retrieval.base import FakeRetriever
    from medrwr.rollout.backends.base import ScriptedBackend
    from medrwr.rollout.engine import RolloutEngine, RolloutRequest

    backend = ScriptedBackend(qwen_tokenizer, {"0": SCRIPT})
    engine = RolloutEngine(backend, FakeRetriever({"d1": "fever and rash in measles"}),
                           RolloutConfig(max_rounds=1, constrain="none"), k=1)
    [tr] = engine.run([RolloutRequest(question="Which finding?", options=["fever", "rash", "cough"])])
    assert tr.rounds == 1 and tr.choice == "B"
    return tr


def _trl_value(cfg, tr, **columns):
    """The reward the TRL path computes (build_rewards: the total, weighted as GRPOTrainer weights it)."""
    from medrwr.train.grpo import build_rewards

    funcs, weights = build_rewards(cfg)
    columns = {"options": [["fever", "rash", "cough"]], **columns}  # dataset columns TRL passes
    return sum(w * f(completions=[tr.completion_text], traces=[tr], answer=["B"], **columns)[0]
               for f, w in zip(funcs, weights))


def _extra_info(tr, **more):
    """What verl's reward manager passes: the row's extra_info updated with the agent loop's extra_fields."""
    return {"index": 0, "answer": "B", "options": ["fever", "rash", "cough"], "medrwr_trace": tr.to_dict(),
            "turn_scores": [], "tool_rewards": [], "num_turns": 4, **more}


def test_stage1_matches_the_trl_reward(trace, monkeypatch):
    from medrwr.config import load_config
    from medrwr.train.verl_reward import compute_score

    monkeypatch.chdir(ROOT)
    out = compute_score("medrwr/mcq", "decoded text (unused: the trace wins)", "B", _extra_info(trace),
                        config="configs/stage1.yaml")
    assert out["score"] == pytest.approx(_trl_value(load_config("configs/stage1.yaml"), trace))
    assert (out["accuracy"], out["format"], out["score"]) == (1.0, 2.0, 7.0)  # 5 * 1 + 1 * 2
    assert out["query_semantic_text"] == 0.0 and out["confidence_gain"] == 0.0  # weights 0 in stage 1
    wrong = compute_score("medrwr/mcq", "", "A", _extra_info(trace), config="configs/stage1.yaml")
    assert wrong["accuracy"] == 0.0 and wrong["score"] == 1.0  # valid with a think block, not correct
    plain = compute_score("medrwr/mcq", "<think>a</think><answer>B</answer>", "B", {}, config="configs/stage1.yaml")
    assert set(plain) == set(out)  # verl stacks reward_extra_info by the first rollout's keys


def test_stage2_adds_query_semantic_terms(trace, tiny_clip_dir, monkeypatch):
    from PIL import Image

    from medrwr.config import load_config
    from medrwr.train import verl_reward

    monkeypatch.chdir(ROOT)
    sets = ("rewards.confidence_weight=0", f"rewards.image_encoder=hf:{tiny_clip_dir}")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    out = verl_reward.compute_score("medrwr/mcq", "", "B", _extra_info(trace, medrwr_images=[image]),
                                    config="configs/stage2.yaml", overrides=list(sets))
    cfg = load_config("configs/stage2.yaml", list(sets))
    assert out["score"] == pytest.approx(_trl_value(cfg, trace, images=[[image]]))
    assert out["query_semantic_text"] > 0.0  # "fever rash" names lexicon entities
    assert out["query_semantic_image"] != 0.0
    assert out["score"] == pytest.approx(7.0 + 0.4 * (out["query_semantic_text"] + out["query_semantic_image"]))
    assert verl_reward.total_reward.cache_info().currsize >= 1  # built once per worker, not per rollout


def test_confidence_gain_is_refused_in_one_line(trace, monkeypatch):
    from medrwr.errors import ConfigError
    from medrwr.train.verl_reward import compute_score

    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="confidence_weight=5.0: the confidence gain needs the policy") as exc:
        compute_score("medrwr/mcq", "", "B", _extra_info(trace), config="configs/stage2.yaml")
    assert "\n" not in str(exc.value)
