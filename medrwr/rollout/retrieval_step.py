"""The engine's retrieval step, outside the loop: one batched search that never raises, and the retrieve block
of one query's hits fitted to a token budget.

A failing or hanging retriever must not end a rollout (docs/architecture.md, Decisions: model mistakes and environment failures
become part of the trace), so :func:`search_batch` hands back an error string instead of raising.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from medrwr import protocol
from medrwr.errors import RetrievalError, RetrievalTimeout
from medrwr.retrieval.base import Hit, Retriever
from medrwr.retrieval.limits import MAX_QUERY_CHARS
from medrwr.rollout.transcript import TokenCodec

logger = logging.getLogger(__name__)

__all__ = ["fit_retrieval_block", "search_batch"]

_TIMED_OUT = object()


def _call_with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """``fn()`` in a daemon thread; :data:`_TIMED_OUT` when it has not returned after ``timeout`` seconds.

    A daemon thread, not an executor: a retriever that hangs for good must not keep the process from exiting.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run, name="medrwr-search", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return _TIMED_OUT
    if "error" in box:
        raise box["error"]
    return box["value"]


def search_batch(
    retriever: Retriever | None,
    queries: list[str],
    k: int,
    mode: str | None,
    timeout: float | None,
    clock: Callable[[], float],
) -> tuple[list[list[Hit]] | None, str | None, float]:
    """One batched ``retriever.search``: ``(hits per query, None, seconds)`` or ``(None, error, seconds)``.

    A model-written query longer than the retrieval limit is searched by its first ``MAX_QUERY_CHARS``
    characters: one runaway query must not fail the search of every row in the batch.
    """
    if retriever is None:
        return None, "no retriever configured", 0.0
    queries = [q[:MAX_QUERY_CHARS] for q in queries]
    t0 = clock()
    try:
        call = functools.partial(retriever.search, queries, k, mode)
        results = _call_with_timeout(call, timeout) if timeout and timeout > 0 else call()
        if results is _TIMED_OUT:
            raise RetrievalTimeout(f"the retriever did not answer within {timeout:g} s", queries)
        if not isinstance(results, list) or len(results) != len(queries):
            n = len(results) if isinstance(results, list) else type(results).__name__
            raise RetrievalError(f"the retriever returned {n} result lists for {len(queries)} queries", queries)
        results = [[h for h in hs][:k] for hs in results]
        return results, None, clock() - t0
    except Exception as exc:  # noqa: BLE001 - any retriever failure is recorded, the rollout continues
        logger.warning("retrieval failed for %d queries: %s: %s", len(queries), type(exc).__name__, exc)
        return None, f"{type(exc).__name__}: {exc}", clock() - t0


def fit_retrieval_block(codec: TokenCodec, docs: Sequence[str], budget: int) -> tuple[str, list[int], bool]:
    """``(text, ids, truncated)`` of the retrieve block of ``docs``, at most ``budget`` tokens.

    Documents are cut by tokens (short ones kept whole, the rest share what is left), never the tags.
    """
    text = protocol.format_retrieval(list(docs))
    ids = codec.encode(text)
    if len(ids) <= budget:
        return text, ids, False
    doc_ids = [codec.encode(protocol.clean_document(d)) for d in docs]
    skeleton = len(codec.encode(protocol.format_retrieval(["x"] * len(docs)))) - len(docs)
    room = max(budget - skeleton - 2 * len(docs), len(docs))
    for _ in range(8):
        cut = _cut(codec, doc_ids, _water_fill([len(d) for d in doc_ids], room))
        text = protocol.format_retrieval([c if c.strip(" …") else "…" for c in cut])
        ids = codec.encode(text)
        if len(ids) <= budget:
            return text, ids, True
        room = max(room - (len(ids) - budget) - len(docs), 0)
    text = protocol.format_retrieval(["…"] * len(docs))
    return text, codec.encode(text), True


def fit_documents(codec: TokenCodec, docs: Sequence[str], budget: int) -> tuple[list[str], bool]:
    """``(documents, truncated)``: ``docs`` (sanitised, whitespace-normalised) in at most ``budget`` tokens in all,
    cut as :func:`fit_retrieval_block` cuts them; the ``rag`` evaluation mode gives its documents the budget one
    retrieval round of the loop gets (``rollout.max_inserted_tokens``)."""
    clean = [protocol.clean_document(d) for d in docs]
    doc_ids = [codec.encode(d) for d in clean]
    if sum(len(d) for d in doc_ids) <= budget:
        return clean, False
    return _cut(codec, doc_ids, _water_fill([len(d) for d in doc_ids], budget)), True


def _cut(codec: TokenCodec, doc_ids: Sequence[Sequence[int]], caps: Sequence[int]) -> list[str]:
    return [codec.decode(d[:c]).rstrip("\ufffd").strip() + (" …" if c < len(d) else "") for d, c in zip(doc_ids, caps)]


def _water_fill(lengths: Sequence[int], room: int) -> list[int]:
    """Per-document token caps summing to at most ``room``: short documents keep everything."""
    caps = [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    left = room
    for j, i in enumerate(order):
        share = left // (len(order) - j)
        caps[i] = min(lengths[i], share)
        left -= caps[i]
    return caps
