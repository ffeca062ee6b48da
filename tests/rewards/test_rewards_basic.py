"""Accuracy, format (paper + compat), length, total and the registry: hand-computed values on tables of cases."""

from __future__ import annotations

import pickle

import pytest

from medrwr.config import RewardConfig
from medrwr.protocol import parse_completion
from medrwr.retrieval.base import Hit
from medrwr.rewards import (
    REWARD_NAMES,
    accuracy_reward,
    format_compat_reward,
    format_reward,
    get_format_reward,
    get_length_reward,
    get_reward,
    get_total_reward,
    length_reward,
)
from medrwr.rollout.trace import RetrievalRecord, RolloutTrace

OPTIONS = ["Pneumonia", "Pneumothorax", "Pleural effusion", "Pulmonary edema"]
DOC = "<retrieve>\n(1) A rim <5 mm is a small pneumothorax; > 2 cm is large.\n(2) Pleura.\n</retrieve>\n"


def ans(a: str) -> str:
    return f"<think>reasoning</think><answer>{a}</answer>"


def searched(a: str, n: int = 1) -> str:
    loop = "".join(f"<think>step {i}</think>\n<query>query {i}</query>\n{DOC}" for i in range(n))
    return f"{loop}<think>done</think>\n<answer>{a}</answer>"


def as_trace(text: str) -> RolloutTrace:
    """A trace as the engine records it (fields filled from the parse, hits from the retrieve blocks)."""
    p = parse_completion(text)
    records = []
    for i, seg in enumerate(s for s in p.segments if s.kind == "retrieve" and s.closed):
        records.append(
            RetrievalRecord(round=i, queries=p.queries[i : i + 1], hits=[[Hit(str(i), seg.content)]])
        )
    from medrwr.protocol import extract_choice

    return RolloutTrace(
        prompt_ids=[1],
        completion_text=text,
        queries=p.queries,
        retrievals=records,
        answer=p.answer,
        choice=extract_choice(p.answer),
        valid=p.valid,
    )


# --------------------------------------------------------------------------------------------- accuracy

ACCURACY_CASES = [
    # (completion, gold, options, expected)
    (ans("B"), "B", OPTIONS, 1.0),
    (ans("b"), "B", OPTIONS, 1.0),
    (ans("B."), "B", OPTIONS, 1.0),
    (ans("(B)"), "B", OPTIONS, 1.0),
    (ans("B)"), "B", OPTIONS, 1.0),
    (ans("B: Pneumothorax"), "B", OPTIONS, 1.0),
    (ans("Answer: B"), "B", OPTIONS, 1.0),
    (ans("The answer is (B)"), "B", OPTIONS, 1.0),
    (ans("A"), "B", OPTIONS, 0.0),
    (ans("(C) Pleural effusion"), "B", OPTIONS, 0.0),
    (ans("Pneumothorax"), "B", OPTIONS, 1.0),  # the gold option's text, no letter
    (ans("Pneumonia"), "B", OPTIONS, 0.0),
    (ans("B"), "B. Pneumothorax", None, 1.0),  # lettered gold
    (ans("B"), "Pneumothorax", OPTIONS, 1.0),  # gold given as option text
    (ans("B"), "b", None, 1.0),
    ("<think>x</think><answer>B", "B", OPTIONS, 0.0),  # truncated: no closed answer block
    ("", "B", OPTIONS, 0.0),
    ("B", "B", OPTIONS, 0.0),  # no answer block at all
    (ans("Yes, there is a pneumothorax."), "yes", None, 1.0),
    (ans("No."), "yes", None, 0.0),
    (ans("no"), "No", None, 1.0),
    (ans("Left lower lobe."), "left lower lobe", None, 1.0),
    (ans("left lobe"), "left lower lobe", None, 0.0),
    (searched("B", 2), "B", OPTIONS, 1.0),
]


@pytest.mark.parametrize("completion,gold,options,expected", ACCURACY_CASES)
def test_accuracy_table(completion, gold, options, expected):
    assert accuracy_reward(completions=[completion], answer=[gold], options=[options]) == [expected]
    # the same value through a trace and through chat-message completions
    assert accuracy_reward(traces=[as_trace(completion)], answer=[gold], options=[options]) == [expected]
    msgs = [[{"role": "assistant", "content": completion}]]
    assert accuracy_reward(completions=msgs, answer=[gold], options=[options]) == [expected]


def test_accuracy_options_as_mapping_and_inline_prompt_letters():
    opts = {"A": "Pneumonia", "B": "Pneumothorax"}
    assert accuracy_reward(completions=[ans("pneumothorax")], answer=["B"], options=[opts]) == [1.0]
    assert accuracy_reward(completions=[ans("B")], answer=[None]) == [0.0]


# ----------------------------------------------------------------------------------------------- format

FORMAT_CASES = [
    # (completion, gold, paper σf, compat value)
    (ans("B"), "B", 1.0, 1.0),  # direct, correct: no retrieval, no bonus
    (ans("A"), "B", 1.0, 1.0),
    (searched("B"), "B", 2.0, 3.0),  # retrieved and correct
    (searched("A"), "B", 1.0, 1.0),  # retrieved, wrong
    (searched("B", 3), "B", 2.0, 3.0),  # several queries
    ("text " + ans("B"), "B", 0.0, 0.0),  # text outside blocks
    ("<think> </think><answer>B</answer>", "B", 0.0, 0.0),  # empty think: paper invalid; compat 1 - 1
    ("<think>a</think><query>q</query><retrieve>d</retrieve><answer>B</answer>", "B", 0.0, 3.0),  # answer
    # right after retrieve: our grammar needs a think first, the reference accepted it
    ("<think>a</think><think>b</think><answer>B</answer>", "B", 0.0, 0.0),  # two thinks in a row
    ("<think>a</think>\n\n\n<answer>B</answer>", "B", 1.0, 0.0),  # three newlines: compat -1
    ("<think>a</think><query>q</query>\n\n\n" + DOC + "<think>b</think><answer>B</answer>", "B", 2.0, 2.0),
    ("<think>use <b>bold</b></think><answer>B</answer>", "B", 0.0, 0.0),  # '<' in a model block
    ("<think>a</think><retrieve>d</retrieve><answer>B</answer>", "B", 0.0, 0.0),  # retrieve without query
    ("<think>a</think><answer>B</answer><think>more</think>", "B", 0.0, 0.0),  # answer not last
    ("<think>a</think><query>q</query>", "B", 0.0, 0.0),  # truncated after a query
    (
        "<think>a</think><query></query><retrieve>d</retrieve><think>b</think><answer>B</answer>",
        "B",
        0.0,
        2.0,
    ),
    ("", "B", 0.0, 0.0),
]


@pytest.mark.parametrize("completion,gold,paper,compat", FORMAT_CASES)
def test_format_table(completion, gold, paper, compat):
    assert format_reward(completions=[completion], answer=[gold]) == [paper]
    assert format_compat_reward(completions=[completion], answer=[gold]) == [compat]
    assert get_format_reward(compat=True)(completions=[completion], answer=[gold]) == [compat]
    assert format_reward(traces=[as_trace(completion)], answer=[gold]) == [paper]


def test_regression_documents_with_angle_brackets_keep_the_format():
    """The reference scored any trajectory whose documents held '<' or '>' as 0 (its [^<>] and tag checks)."""
    text = searched("B")
    assert "<5 mm" in text and "> 2 cm" in text
    assert format_reward(completions=[text], answer=["B"]) == [2.0]
    assert format_compat_reward(completions=[text], answer=["B"]) == [3.0]


# ----------------------------------------------------------------------------------------------- length


def test_length_table():
    def model_text(n):
        core = "<think></think><answer>B</answer>"
        return "<think>" + "x" * (n - len(core)) + "</think><answer>B</answer>"

    texts = [model_text(511), model_text(512), model_text(3072), model_text(3073)]
    assert [len(t) for t in texts] == [511, 512, 3072, 3073]
    assert length_reward(completions=texts) == [-1.0, 0.0, 0.0, -1.0]
    # retrieve blocks do not count: 600 model characters + a 5,000-character document
    doc = "<retrieve>\n(1) " + "d" * 5000 + "\n</retrieve>\n"
    with_doc = model_text(600).replace("<answer>", doc + "<answer>", 1)
    assert length_reward(completions=[with_doc]) == [0.0]
    assert get_length_reward(10, 20)(completions=["x" * 15, "x" * 25]) == [0.0, -1.0]
    with pytest.raises(ValueError, match="min_chars"):
        get_length_reward(10, 5)


# ------------------------------------------------------------------------------------------------ total


class SetExtractor:
    """Entities = the vocabulary words present in the text (a fake with fixed, hand-checkable sets)."""

    name = "fake"
    vocab = frozenset({"pneumothorax", "pleura", "trauma", "effusion", "rim"})

    def extract(self, texts):
        return [{w.strip(".,;()").lower() for w in t.split()} & self.vocab for t in texts]


def test_total_weights_and_components():
    text = "<think>a</think><query>pneumothorax trauma</query>" + DOC + "<think>b</think><answer>B</answer>"
    kwargs = {
        "completions": [text, ans("A")],
        "answer": ["B", "B"],
        "options": [OPTIONS, OPTIONS],
        "explanation": ["Air in the pleura.", None],
    }
    cfg = RewardConfig(confidence_weight=0.0)
    r = get_total_reward(cfg, extractor=SetExtractor())
    parts = r.components(**kwargs)
    # Q = {pneumothorax, trauma}, K = {rim, pneumothorax, pleura}, G = {pneumothorax, pleura}
    assert parts["query_semantic_text"] == [pytest.approx(1 / 2 + 2 / 3), 0.0]
    assert parts["format"] == [2.0, 1.0] and parts["accuracy"] == [1.0, 0.0]
    assert parts["query_semantic_image"] == [0.0, 0.0]  # no encoder configured
    assert "length" not in parts and "confidence_gain" not in parts
    assert r(**kwargs) == [pytest.approx(2 + 5 + 0.4 * (1 / 2 + 2 / 3)), pytest.approx(1.0)]
    custom = get_total_reward(
        RewardConfig(
            format_weight=2, accuracy_weight=1, query_weight=0, confidence_weight=0, length_weight=1
        ),
        extractor=SetExtractor(),
    )
    assert custom(**kwargs) == [pytest.approx(2 * 2 + 1 - 1), pytest.approx(2 * 1 + 0 - 1)]
    compat = get_total_reward(RewardConfig(confidence_weight=0, query_weight=0, compat=True))
    assert compat(**kwargs) == [pytest.approx(3 + 5), pytest.approx(1.0)]


def test_total_needs_the_policy_for_confidence_gain():
    with pytest.raises(ValueError, match="confidence_weight"):
        get_total_reward(RewardConfig())


def test_total_logs_components_through_trl_log_metric():
    logged = {}
    r = get_total_reward(RewardConfig(confidence_weight=0, query_weight=0))
    r(completions=[ans("B")], answer=["B"], log_metric=lambda k, v: logged.__setitem__(k, v))
    assert logged == {"rewards/accuracy/mean": 1.0, "rewards/format/mean": 1.0}


# ------------------------------------------------------------------------------------------ registry/TRL


def test_registry_names_and_unknown_name():
    for name in REWARD_NAMES:
        if name in ("confidence_gain", "total"):
            with pytest.raises(ValueError):
                get_reward(name)
            continue
        fn = get_reward(name)
        assert callable(fn) and isinstance(fn.__name__, str)
    assert callable(get_reward("total", RewardConfig(confidence_weight=0)))
    with pytest.raises(ValueError, match="valid names: accuracy, format"):
        get_reward("acc")


def test_rewards_are_picklable():
    for fn in (
        get_reward("format", RewardConfig(compat=True)),
        get_length_reward(1, 2),
        get_reward("query_semantic_text"),
        get_total_reward(RewardConfig(confidence_weight=0)),
    ):
        clone = pickle.loads(pickle.dumps(fn))
        assert clone.__name__ == fn.__name__
        assert clone(completions=[searched("B")], answer=["B"]) == fn(
            completions=[searched("B")], answer=["B"]
        )


def test_trl_keyword_convention():
    """Called exactly as TRL 1.16's _calculate_rewards does, with extra columns and rollout keys."""
    texts = [searched("B"), ans("A")]
    traces = [as_trace(t) for t in texts]
    kwargs = {
        "prompts": [[{"role": "user", "content": "Q?\nA. x\nB. y"}]] * 2,
        "completions": [[{"role": "assistant", "content": t}] for t in texts],
        "completion_ids": [[1, 2, 3], [4, 5]],
        "answer": ["B", "B"],
        "question_id": ["q1", "q1"],
        "image": [None, None],
        "traces": traces,
        "trainer_state": object(),
        "log_extra": lambda *a, **k: None,
        "log_metric": lambda *a, **k: None,
    }
    for name in REWARD_NAMES:
        if name == "confidence_gain":
            continue
        fn = get_reward(name, RewardConfig(confidence_weight=0))
        out = fn(**kwargs)
        assert len(out) == 2 and all(isinstance(x, float) for x in out), name
    assert get_reward("accuracy")(**kwargs) == [1.0, 0.0]
    assert get_reward("format")(**kwargs) == [2.0, 1.0]


def test_mismatched_columns_are_a_clear_error():
    with pytest.raises(ValueError, match="one per completion"):
        accuracy_reward(completions=["a", "b"], answer=["B"])
    with pytest.raises(ValueError, match="completions"):
        accuracy_reward(answer=["B"])



def test_serialised_traces_are_accepted():
    text = searched("B")
    trace = as_trace(text)
    as_dict = trace.to_dict()
    for fn in (accuracy_reward, format_reward, format_compat_reward, length_reward):
        assert (
            fn(traces=[as_dict], answer=["B"])
            == fn(traces=[trace], answer=["B"])
            == fn(completions=[text], answer=["B"])
        )
    assert format_reward(
        traces=[{"completion_text": "<think>a</think><answer>B</answer>", "bogus": 1}], answer=["B"]
    ) == [1.0]
