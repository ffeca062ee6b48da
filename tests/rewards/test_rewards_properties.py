"""Property tests: no reward raises, every value is a finite float in its documented range."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medrwr.config import RewardConfig
from medrwr.retrieval.base import Hit
from medrwr.rewards import (
    accuracy_reward,
    format_compat_reward,
    format_reward,
    get_query_semantic_image_reward,
    get_total_reward,
    length_reward,
    query_semantic_text_reward,
)
from medrwr.rewards.format import COMPAT_RANGE, PAPER_RANGE
from medrwr.rewards.query_semantic import IMAGE_RANGE, TEXT_RANGE
from medrwr.rollout.trace import RetrievalRecord, RolloutTrace

FRAGMENTS = [
    "<think>",
    "</think>",
    "<query>",
    "</query>",
    "<retrieve>",
    "</retrieve>",
    "<answer>",
    "</answer>",
    "A",
    "B",
    "b",
    "(B)",
    "B.",
    "Answer: C",
    " ",
    "\n",
    "\n\n\n",
    "<",
    ">",
    "<5 mm",
    "=x>",
    "<b>",
    "None",
    "(1) ",
    "Retrieval failed: timeout",
    "pneumothorax",
    "heart attack",
    "MI",
    "COPD",
    "yes",
    "no",
    "é",
    "\x00",
]
completion_text = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join), st.text(max_size=200)
)
golds = st.one_of(
    st.none(),
    st.sampled_from(["A", "B", "b", "B. Pneumothorax", "Pneumothorax", "yes", "no", "free text", ""]),
    st.text(max_size=20),
    st.integers(-3, 12),
)
options = st.one_of(
    st.none(),
    st.just(["Pneumonia", "Pneumothorax", "Effusion"]),
    st.dictionaries(st.sampled_from("ABCDEFGHIJKZ"), st.text(max_size=10), max_size=5),
    st.text(max_size=30),
)
completions_any = st.one_of(
    completion_text, completion_text.map(lambda t: [{"role": "assistant", "content": t}]), st.none()
)


@st.composite
def traces(draw):
    text = draw(completion_text)
    queries = draw(st.lists(st.text(max_size=40), max_size=3))
    hits = [
        [Hit(str(i), draw(st.text(max_size=60))) for i in range(draw(st.integers(0, 3)))] for _ in queries
    ]
    return RolloutTrace(
        prompt_ids=[1, 2],
        completion_text=text,
        queries=queries,
        retrievals=[RetrievalRecord(i, [q], [h]) for i, (q, h) in enumerate(zip(queries, hits))],
        answer=draw(st.one_of(st.none(), st.text(max_size=20))),
        choice=draw(st.one_of(st.none(), st.sampled_from(list("ABCDab")), st.text(max_size=3))),
        valid=draw(st.booleans()),
        images=draw(
            st.lists(st.sampled_from(["/nonexistent.png", "data:image/png;base64,!!", ""]), max_size=2)
        ),
        option_probs=draw(
            st.one_of(st.none(), st.dictionaries(st.sampled_from("ABCD"), st.floats(allow_nan=True)))
        ),
    )


class RandomJointEncoder:
    """A joint encoder stand-in (unit vectors from a hash) so the image term is exercised at hypothesis speed."""

    name, dim, joint = "hash", 8, True

    def _vec(self, key: str) -> np.ndarray:
        v = np.random.default_rng(abs(hash(key)) % (2**32)).normal(size=self.dim).astype(np.float32)
        return v / np.linalg.norm(v)

    def encode_images(self, images, batch_size=32):
        return np.stack([self._vec(repr(getattr(im, "size", im))) for im in images])

    def encode_texts(self, texts, batch_size=64):
        return np.stack([self._vec(t) for t in texts])


def _image():
    from PIL import Image

    return Image.new("RGB", (8, 8), (10, 20, 30))


REWARDS = [
    (accuracy_reward, (0.0, 1.0)),
    (format_reward, PAPER_RANGE),
    (format_compat_reward, COMPAT_RANGE),
    (length_reward, (-1.0, 0.0)),
    (query_semantic_text_reward, TEXT_RANGE),
]
IMAGE_REWARD = get_query_semantic_image_reward(RandomJointEncoder())
TOTAL = get_total_reward(
    RewardConfig(confidence_weight=0, length_weight=1.0), image_encoder=RandomJointEncoder()
)
TOTAL_RANGE = (-1.0 - 0.4, 2.0 + 5.0 + 0.4 * 3.0)
ALL = [*REWARDS, (IMAGE_REWARD, IMAGE_RANGE), (TOTAL, TOTAL_RANGE)]


def _check(values, n, lo, hi):
    assert isinstance(values, list) and len(values) == n
    for v in values:
        assert isinstance(v, float) and math.isfinite(v) and lo - 1e-9 <= v <= hi + 1e-9, (v, lo, hi)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(completions_any, golds, options), min_size=1, max_size=4))
def test_random_completions_give_finite_values_in_range(rows):
    comps = [r[0] for r in rows]
    kwargs = {
        "answer": [r[1] for r in rows],
        "options": [r[2] for r in rows],
        "images": [[_image()]] * len(rows),
    }
    for fn, (lo, hi) in ALL:
        _check(fn(completions=comps, **kwargs), len(rows), lo, hi)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(traces(), golds, options), min_size=1, max_size=4))
def test_random_traces_give_finite_values_in_range(rows):
    trs = [r[0] for r in rows]
    kwargs = {"answer": [r[1] for r in rows], "options": [r[2] for r in rows]}
    for fn, (lo, hi) in ALL:
        _check(fn(traces=trs, completions=[t.completion_text for t in trs], **kwargs), len(rows), lo, hi)


@pytest.mark.parametrize(
    "text",
    [
        "<" * 1_000_000,
        "<query>" * 140_000,
        "<think>a</think>" * 60_000,
        "\n" * 1_000_000,
        (
            "<think>t</think><query>pneumothorax MI</query><retrieve>\n(1) "
            + "COPD heart attack " * 30
            + "\n</retrieve>\n"
        )
        * 2000
        + "<think>x</think><answer>B</answer>",
    ],
    ids=["angles", "unclosed-queries", "thinks", "newlines", "many-rounds"],
)
def test_megabyte_completions(text):
    kwargs = {"answer": ["B"], "options": [["Pneumonia", "Pneumothorax"]], "images": [[_image()]]}
    for fn, (lo, hi) in ALL:
        _check(fn(completions=[text], **kwargs), 1, lo, hi)
