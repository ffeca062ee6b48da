"""The labelled question sets of benchmarks/retrieval_quality.py: every expected id is a real vocabulary record,
and the dev-only questions never share an answer with a test question (the split that keeps tuning honest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"
FILES = ("clinical_questions.json", "clinical_questions_dev.json", "clinical_questions_heldout.json")


@pytest.fixture(scope="module")
def vocabulary() -> set[str]:
    from medrwr.vocab.sources import iter_concepts

    return {c.id for c in iter_concepts()}


@pytest.mark.parametrize("name", FILES)
def test_every_expected_id_is_a_vocabulary_record(name, vocabulary):
    questions = json.loads((DATA / name).read_text())["questions"]
    assert len(questions) >= 50
    for q in questions:
        assert q["query"].strip() and q["expected"], q
        assert len(q["expected"]) == len(q["names"]), q["query"]
        assert set(q["expected"]) <= vocabulary, (q["query"], set(q["expected"]) - vocabulary)


def test_dev_questions_share_no_answer_with_test_questions():
    import sys

    sys.path.insert(0, str(DATA.parent))
    try:
        import retrieval_quality as rq
    finally:
        sys.path.remove(str(DATA.parent))
    sets, _ = rq.build_sets(10)  # the splits exactly as the benchmark assigns them
    test_ids = {i for it in sets["clinical"] + sets["clinical_heldout"] if it.split == "test" for i in it.targets}
    assert {it.split for it in sets["clinical_dev"]} == {"dev"}
    dev = json.loads((DATA / "clinical_questions_dev.json").read_text())["questions"]
    shared = {(q["query"], i) for q in dev for i in q["expected"] if i in test_ids}
    assert not shared
