"""The reward registry: it, RewardConfig's weight fields, TotalReward and the docs table agree."""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import pytest

import medrwr.rewards as rewards_pkg
from medrwr.config import RewardConfig, load_config
from medrwr.errors import ConfigError
from medrwr.rewards.registry import (
    REWARD_NAMES,
    REWARD_SPECS,
    SPECS,
    TERM_SPECS,
    get_reward,
    get_spec,
    render_table,
)
from medrwr.rewards.total import TotalReward, get_total_reward

ROOT = Path(__file__).resolve().parents[2]
WEIGHT_FIELDS = {f.name for f in dataclasses.fields(RewardConfig) if f.name.endswith("_weight")}
CONFIGS = ROOT / "configs"


class NoEntities:
    name = "none"

    def extract(self, texts):
        return [set() for _ in texts]


def test_names_are_unique_and_ordered():
    assert len(REWARD_NAMES) == len(SPECS) == len(set(REWARD_NAMES))
    assert all(REWARD_SPECS[s.name] is s for s in SPECS)
    assert REWARD_NAMES == (
        "accuracy",
        "format",
        "format_compat",
        "length",
        "query_semantic_text",
        "query_semantic_image",
        "confidence_gain",
        "total",
    )
    assert rewards_pkg.REWARD_NAMES is REWARD_NAMES and rewards_pkg.get_reward is get_reward


def test_weight_fields_match_the_registry_both_ways():
    named = {s.weight for s in SPECS if s.weight is not None}
    assert named == WEIGHT_FIELDS, "every weighted reward needs a RewardConfig field and vice versa"
    for s in TERM_SPECS:
        assert s.term is not None and s.range is not None, s.name
    for s in SPECS:
        if s.weight is None:
            assert s.term is None, s.name


def test_total_iterates_the_registry():
    all_on = RewardConfig(**{**{f: 1.0 for f in WEIGHT_FIELDS}, "confidence_weight": 0.0})
    total = TotalReward(all_on, extractor=NoEntities())
    assert list(total.weights()) == [s.name for s in TERM_SPECS]
    assert list(total.terms) == [s.name for s in TERM_SPECS if s.name != "confidence_gain"]
    parts = total.components(completions=["<think>a</think><answer>B</answer>"], answer=["B"])
    assert list(parts) == list(total.terms)
    off = TotalReward(RewardConfig(**{f: 0.0 for f in WEIGHT_FIELDS}))
    assert off.terms == {} and off(completions=["x", "y"]) == [0.0, 0.0]


def test_each_term_equals_its_standalone_reward():
    text = (
        "<think>a</think><query>pneumothorax</query><retrieve>\n(1) Pneumothorax is air.\n</retrieve>\n"
        "<think>b</think><answer>B</answer>"
    )
    kwargs = {
        "completions": [text, "<think>a</think><answer>A</answer>", "garbage"],
        "answer": ["B", "B", "B"],
        "options": [["Pneumonia", "Pneumothorax"]] * 3,
    }
    for compat in (False, True):
        cfg = RewardConfig(confidence_weight=0, length_weight=1, compat=compat)
        parts = get_total_reward(cfg).components(**kwargs)
        for name, values in parts.items():
            assert get_reward(name, cfg)(**kwargs) == values, (name, compat)
        lo, hi = get_total_reward(cfg).value_range()
        for v in get_total_reward(cfg)(**kwargs):
            assert lo <= v <= hi


def test_total_range_is_the_weighted_sum_of_term_ranges():
    from medrwr.rewards.confidence_gain import RANGE

    cfg = RewardConfig()
    r = TotalReward(cfg, confidence_reward=object())
    assert r.value_range() == pytest.approx((-0.4 + 5 * RANGE[0], 2 + 5 + 0.4 * 3 + 5 * RANGE[1]))
    compat = TotalReward(RewardConfig(compat=True, query_weight=0, confidence_weight=0))
    assert compat.value_range() == (-2.0 + 0.0, 3.0 + 5.0)


def test_unknown_name_lists_every_valid_name():
    with pytest.raises(ValueError, match="unknown reward 'nope'; valid names: " + ", ".join(REWARD_NAMES)):
        get_reward("nope")
    with pytest.raises(ValueError, match="valid names"):
        get_spec("")


def test_confidence_gain_needs_the_policy():
    assert get_spec("confidence_gain").needs_model
    assert [s.name for s in SPECS if s.needs_model] == ["confidence_gain"]
    with pytest.raises(ValueError, match="confidence_weight=5.0 but no policy"):
        get_reward("total")


def test_stages_follow_the_stage_configs():
    """A reward belongs to stage N exactly when configs/stageN.yaml gives it a non-zero weight."""
    for stage in (1, 2):
        cfg = load_config(CONFIGS / f"stage{stage}.yaml").rewards
        on = {s.name for s in TERM_SPECS if getattr(cfg, s.weight)}
        assert on == {s.name for s in TERM_SPECS if stage in s.stages}, stage


def test_terms_and_rewards_pickle():
    cfg = RewardConfig(confidence_weight=0, length_weight=1, compat=True)
    total = get_total_reward(cfg)
    clone = pickle.loads(pickle.dumps(total))
    kw = {"completions": ["<think>a</think><answer>B</answer>"], "answer": ["B"]}
    assert clone(**kw) == total(**kw) and clone.__name__ == "total_reward"
    for name in REWARD_NAMES:
        if name in ("confidence_gain", "total"):
            continue
        fn = get_reward(name, cfg)
        assert pickle.loads(pickle.dumps(fn))(**kw) == fn(**kw)


def test_reward_config_rejects_non_finite_weights():
    with pytest.raises(ConfigError, match="rewards.query_weight"):
        RewardConfig(query_weight=float("nan"))
    with pytest.raises(ConfigError, match="confidence_batch_size"):
        RewardConfig(confidence_batch_size=0)


def test_docs_table_is_the_registry():
    """docs/method.md holds render_table() between its markers (see the registry's docstring to regenerate)."""
    text = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- rewards-table:start -->\n(.*?)<!-- rewards-table:end -->", text, re.DOTALL)
    assert m, "docs/method.md lost its rewards-table markers"
    assert m.group(1) == render_table(), (
        "docs/method.md's reward table drifted from the registry: paste render_table()'s output"
    )
    for s in SPECS:
        assert "|" not in s.description, s.name  # would break the Markdown table


def test_init_has_no_logic():
    import ast

    tree = ast.parse(Path(rewards_pkg.__file__).read_text(encoding="utf-8"))
    kinds = {type(node).__name__ for node in tree.body}
    assert kinds <= {"Expr", "ImportFrom", "Import", "Assign"}, kinds
