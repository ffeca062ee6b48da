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


def test_fit_documents_keeps_short_documents_whole_and_cuts_the_rest_to_the_budget(qwen_tokenizer):
    """The rag evaluation mode's documents: one retrieval round's token budget, cut as the loop cuts them."""
    from medrwr.rollout.retrieval_step import fit_documents
    from medrwr.rollout.transcript import TokenCodec

    codec = TokenCodec(qwen_tokenizer)
    short = "Croup: barking cough and stridor in young children."
    long = " ".join(f"sentence {i} about pleural effusion and its signs on a chest radiograph." for i in range(40))
    docs, cut = fit_documents(codec, [long, short], 60)
    assert cut and docs[1] == short and docs[0].endswith(" …") and long.startswith(docs[0][:-2])
    assert sum(len(codec.encode(d)) for d in docs) <= 60 + 2  # the ellipsis may add a token
    same, cut = fit_documents(codec, [short, "  two\t words "], 60)
    assert not cut and same == [short, "two words"]
