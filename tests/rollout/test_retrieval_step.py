"""The engine's retrieval step: one runaway model query must not fail the batch it is searched in."""

from __future__ import annotations

import time

from medrwr.retrieval.base import FakeRetriever
from medrwr.retrieval.limits import MAX_QUERY_CHARS
from medrwr.rollout.retrieval_step import search_batch


def test_overlong_model_query_is_searched_by_its_head_and_the_batch_survives():
    retriever = FakeRetriever({"d1": "pneumonia consolidation", "d2": "pleural effusion fluid"})
    runaway = "effusion " + "x" * (2 * MAX_QUERY_CHARS)
    hits, error, _ = search_batch(retriever, ["pneumonia", runaway], k=1, mode=None, timeout=5.0,
                                  clock=time.perf_counter)
    assert error is None
    assert [h[0].doc_id for h in hits] == ["d1", "d2"]
    assert len(retriever.calls[-1][1]) == MAX_QUERY_CHARS  # what reached the retriever


def test_retriever_failure_is_returned_not_raised():
    retriever = FakeRetriever({"d1": "a"}, fail_with=RuntimeError("index gone"))
    hits, error, _ = search_batch(retriever, ["a"], k=1, mode=None, timeout=5.0, clock=time.perf_counter)
    assert hits is None and "index gone" in error
