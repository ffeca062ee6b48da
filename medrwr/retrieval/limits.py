"""The one set of input limits: what a query, a batch, ``k`` and a question may be.

The CLI (``medrwr retrieve``, ``medrwr ask``), every :class:`~medrwr.retrieval.base.Retriever`'s
``search`` (through :func:`~medrwr.retrieval.base.check_search_args`) and the retrieval server
(:mod:`medrwr.retrieval.service.requests`, whose ``server.max_*`` settings default to these numbers
and may only lower them) check input with the functions here, before any model or index loads. A
broken rule raises :class:`~medrwr.errors.InputError` (a ``ValueError``) naming the argument; the
CLI prints it on one line (exit 2) and the server answers 400 with its ``code`` and ``param``.

>>> check_query("  ", where="queries[0]")
Traceback (most recent call last):
...
medrwr.errors.InputError: queries[0] is empty or whitespace only
>>> check_k(3)
3
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from medrwr.errors import InputError, InputTypeError

MAX_QUERY_CHARS = 4096
"""Characters in one search query (a query is a phrase, not a document)."""
MAX_K = 100
"""Hits per query."""
MAX_QUERIES = 256
"""Queries in one request to the server or one ``medrwr retrieve`` call. In-process ``search`` does
not cap its batch: the rollout engine sends one batch per turn for every paused row."""
MAX_QUESTION_CHARS = 8000
"""Characters in one ``ask`` question (about 2,000 tokens: the prompt, the retrieved blocks and the
answer must still fit the policy's context)."""
MAX_OPTION_CHARS = 1000
"""Characters in one answer option."""


def _note(setting: str | None) -> str:
    return f" ({setting})" if setting else ""


def check_query(query: Any, *, where: str = "the query", max_chars: int = MAX_QUERY_CHARS,
                setting: str | None = None) -> str:
    """``query`` when it is a non-blank string of at most ``max_chars`` characters, else :class:`InputError`."""
    if not isinstance(query, str):
        raise InputTypeError(f"{where} must be a string, got {type(query).__name__}", "invalid_query", where)
    if len(query) > max_chars:
        raise InputError(f"{where} has {len(query)} characters; the limit is {max_chars}{_note(setting)}",
                         "query_too_long", where)
    if not query.strip():
        raise InputError(f"{where} is empty or whitespace only", "empty_query", where)
    return query


def check_queries(queries: Sequence[Any], *, max_queries: int | None = MAX_QUERIES,
                  max_chars: int = MAX_QUERY_CHARS, allow_empty_batch: bool = False,
                  settings: tuple[str | None, str | None] = (None, None)) -> list[str]:
    """Every query checked by :func:`check_query`; the batch holds 1..``max_queries`` of them.

    ``max_queries=None`` does not cap the batch; ``settings`` names the config keys of the two
    limits (``server.max_queries_per_request``, ``server.max_query_chars``) in messages.
    """
    if isinstance(queries, str):
        raise InputTypeError("search() takes a list of queries; wrap a single query as [query]",
                             "invalid_queries", "queries")
    queries = list(queries)
    if not queries and not allow_empty_batch:
        raise InputError("'queries' is empty: send at least one query", "empty_queries", "queries")
    if max_queries is not None and len(queries) > max_queries:
        raise InputError(f"too many queries in one request: {len(queries)} > {max_queries}{_note(settings[0])}; "
                         "split the batch", "too_many_queries", "queries")
    for i, q in enumerate(queries):
        check_query(q, where=f"queries[{i}]", max_chars=max_chars, setting=settings[1])
    return queries


def check_k(k: Any, *, max_k: int | None = MAX_K, setting: str | None = None) -> int:
    """``k`` when it is an integer in 1..``max_k`` (numpy integers count; ``max_k=None``: no upper
    bound), else :class:`InputError`."""
    ok = not isinstance(k, bool) and isinstance(k, numbers.Integral) and k >= 1
    if ok and (max_k is None or k <= max_k):
        return int(k)
    if setting:  # the server's wording, which its clients match on
        raise InputError(f"k must be between 1 and {max_k} ({setting}), got {k!r}", "k_out_of_range", "k")
    bound = "" if max_k is None else f" no larger than {max_k}"
    raise InputError(f"k must be a positive integer{bound}, got {k!r}", "k_out_of_range", "k")


def check_question(question: Any, options: Sequence[Any] | None = None, *, max_options: int = 10) -> None:
    """An ``ask`` question: non-blank, at most :data:`MAX_QUESTION_CHARS`; options non-blank, at most
    ``max_options`` of :data:`MAX_OPTION_CHARS` each."""
    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty; ask something, e.g. medrwr ask \"Which finding? A. x B. y\"",
                         "empty_question", "question")
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(f"the question has {len(question)} characters; the limit is {MAX_QUESTION_CHARS} "
                         "(it must fit the policy's context with the retrieved documents)", "question_too_long",
                         "question")
    options = list(options or [])
    if len(options) > max_options:
        raise InputError(f"{len(options)} options; at most {max_options} (letters A-{chr(64 + max_options)})",
                         "too_many_options", "options")
    for i, opt in enumerate(options):
        if not isinstance(opt, str) or not opt.strip():
            raise InputError(f"option {i + 1} is empty", "empty_option", f"options[{i}]")
        if len(opt) > MAX_OPTION_CHARS:
            raise InputError(f"option {i + 1} has {len(opt)} characters; the limit is {MAX_OPTION_CHARS}",
                             "option_too_long", f"options[{i}]")


__all__ = [
    "MAX_K",
    "MAX_OPTION_CHARS",
    "MAX_QUERIES",
    "MAX_QUERY_CHARS",
    "MAX_QUESTION_CHARS",
    "check_k",
    "check_queries",
    "check_query",
    "check_question",
]
