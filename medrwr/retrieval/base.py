"""The interfaces every retriever implements, and a fake beside each (as httpx ships MockTransport).

The rollout engine, the server and the evaluation harness only see these contracts, so an in-process
hybrid index, the HTTP client and the Ray-sharded router are interchangeable: nobody probes a
retriever for attributes. :func:`medrwr.retrieval.open.open_retriever` is the one place that
chooses which one a config gets.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

from medrwr.retrieval.limits import check_k, check_queries

SearchMode = Literal["bm25", "dense", "hybrid"]
SEARCH_MODES: tuple[str, ...] = ("bm25", "dense", "hybrid")


@dataclass(frozen=True)
class Hit:
    """One retrieved passage. ``source`` names the corpus or retriever it came from."""

    doc_id: str
    text: str
    title: str = ""
    score: float = 0.0
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Hit":
        return cls(
            doc_id=str(d["doc_id"]),
            text=str(d.get("text", "")),
            title=str(d.get("title", "") or ""),
            score=float(d.get("score", 0.0)),
            source=str(d.get("source", "") or ""),
        )


@dataclass(frozen=True)
class ImageHit:
    """One retrieved (image, report) case. ``image_path`` is a path, or an id when the bytes are inline."""

    image_id: str
    image_path: str
    report: str
    score: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageHit":
        return cls(
            image_id=str(d.get("image_id", d.get("image_path", ""))),
            image_path=str(d.get("image_path", "")),
            report=str(d.get("report", "")),
            score=float(d.get("score", 0.0)),
            metadata=dict(d.get("metadata") or {}),
        )


def check_search_args(queries: Sequence[str], k: Any) -> list[str]:
    """Validate ``search`` arguments shared by every retriever (in-process, sharded, HTTP); returns the queries as a list.

    The rules are :mod:`medrwr.retrieval.limits`' (the server and the CLI apply the same ones): each
    query a non-blank string of at most ``MAX_QUERY_CHARS``, ``k`` a positive integer; an empty batch
    is allowed (it returns ``[]``). ``k`` above the corpus returns every document, so in-process
    search does not cap it: ``MAX_K`` caps what a user types (CLI) or sends (server). Raises
    :class:`~medrwr.errors.InputError` (a ValueError) or :class:`~medrwr.errors.InputTypeError`
    (a TypeError) before any work.
    """
    queries = check_queries(queries, max_queries=None, allow_empty_batch=True)
    check_k(k, max_k=None)
    return queries


def check_mode(mode: str | None, modes: Sequence[str], default_mode: str, where: str) -> str:
    """The mode a search runs in: ``mode``, or ``default_mode`` when None; ValueError naming the choices."""
    mode = mode or default_mode
    if mode not in SEARCH_MODES:
        raise ValueError(f"unknown retrieval mode {mode!r}; choose one of {', '.join(SEARCH_MODES)}")
    if mode not in modes:
        raise ValueError(
            f"mode {mode!r} is not available for {where} (available: {', '.join(modes)}): dense and hybrid "
            "modes need embeddings and it was built without them (dense=False); use mode='bm25' or rebuild"
        )
    return mode


def pick_default_mode(wanted: str, modes: Sequence[str]) -> str:
    """``wanted`` when the index has it, else hybrid, else its first mode (a BM25-only index: bm25)."""
    if wanted in modes:
        return wanted
    return "hybrid" if "hybrid" in modes else modes[0]


class Retriever(abc.ABC):
    """Batched text retrieval: the contract every text retriever implements.

    - ``search(queries, k=3, mode=None)`` returns one list of at most ``k`` hits per query, in query
      order, best first. ``mode`` None means :attr:`default_mode`; a mode outside :attr:`modes`, a
      bare string instead of a list, a blank or over-long query (:mod:`medrwr.retrieval.limits`), or
      ``k < 1`` raise ValueError/TypeError before any work. A
      backend failure raises :class:`~medrwr.errors.RetrievalError` (or a subclass); callers such as
      the rollout engine record it instead of crashing.
    - ``modes``: the search modes this retriever answers, a subset of ``SEARCH_MODES`` in that order.
    - ``default_mode``: the mode used when ``search`` gets ``mode=None``; always one of ``modes``.
    - ``doc_count``: documents searched.
    - ``describe()``: a JSON-able summary for health checks and logs: ``kind``, ``doc_count``,
      ``modes``, ``default_mode``, ``encoder`` (name or None), ``path`` or ``url``, ``shards`` when
      sharded. It never loads a lazily loaded encoder.
    - ``warmup()``: pay one-time costs now (load the query encoder, connect), not on the first query.
    - ``close()``: release files, threads and connections; also ``with retriever: ...``.
    """

    @abc.abstractmethod
    def search(self, queries: Sequence[str], k: int = 3, mode: SearchMode | None = None) -> list[list[Hit]]: ...

    @property
    @abc.abstractmethod
    def modes(self) -> tuple[str, ...]: ...

    @property
    @abc.abstractmethod
    def default_mode(self) -> str: ...

    @property
    @abc.abstractmethod
    def doc_count(self) -> int: ...

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]: ...

    def warmup(self) -> None:
        """Run one query through every mode (loads the encoder); override when cheaper ways exist."""
        for mode in self.modes:
            self.search(["warmup"], k=1, mode=mode)

    def close(self) -> None:
        """Release resources; the retriever must not be used afterwards."""

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageRetriever(abc.ABC):
    """Batched image-to-(image, report) retrieval: the contract every image retriever implements.

    ``search_images(images, k=1)`` takes PIL images, paths or raw bytes and returns one list of at
    most ``k`` :class:`ImageHit` per image, best first. ``doc_count`` is the number of indexed cases,
    ``describe()`` a JSON-able summary (``kind``, ``doc_count``, ``encoder``, ``path`` or ``url``),
    ``close()`` releases resources (also ``with index: ...``).
    """

    @abc.abstractmethod
    def search_images(self, images: Sequence[Any], k: int = 1) -> list[list[ImageHit]]: ...

    @property
    @abc.abstractmethod
    def doc_count(self) -> int: ...

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None:
        """Release resources; the retriever must not be used afterwards."""

    def __enter__(self) -> ImageRetriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakeRetriever(Retriever):
    """A deterministic in-memory retriever for tests and examples.

    ``docs`` maps doc_id -> text. Scores are word-overlap counts; ties break by doc_id; every mode
    answers the same way. Set ``fail_with`` to an exception to make every call raise it (to test
    failure handling).
    """

    def __init__(self, docs: dict[str, str], fail_with: Exception | None = None):
        self.docs = dict(docs)
        self.fail_with = fail_with
        self.calls: list[list[str]] = []

    @property
    def modes(self) -> tuple[str, ...]:
        return SEARCH_MODES

    @property
    def default_mode(self) -> str:
        return "hybrid"

    @property
    def doc_count(self) -> int:
        return len(self.docs)

    def describe(self) -> dict[str, Any]:
        return {"kind": "fake", "doc_count": self.doc_count, "modes": list(self.modes),
                "default_mode": self.default_mode, "encoder": None, "path": None}

    def warmup(self) -> None:
        pass

    def search(self, queries: Sequence[str], k: int = 3, mode: SearchMode | None = None) -> list[list[Hit]]:
        self.calls.append(list(queries))
        if self.fail_with is not None:
            raise self.fail_with
        queries = check_search_args(queries, k)
        check_mode(mode, self.modes, self.default_mode, "the fake retriever")
        results = []
        for q in queries:
            words = set(q.lower().split())
            scored = sorted(
                ((len(words & set(t.lower().split())), doc_id, t) for doc_id, t in self.docs.items()),
                key=lambda x: (-x[0], x[1]),
            )
            results.append([Hit(doc_id, t, score=float(s), source="fake") for s, doc_id, t in scored[:k] if s > 0])
        return results


class FakeImageRetriever(ImageRetriever):
    """Returns the same scripted cases for every image; records calls."""

    def __init__(self, cases: Sequence[ImageHit]):
        self.cases = list(cases)
        self.calls = 0

    @property
    def doc_count(self) -> int:
        return len(self.cases)

    def describe(self) -> dict[str, Any]:
        return {"kind": "fake-image", "doc_count": self.doc_count, "encoder": None, "path": None}

    def search_images(self, images: Sequence[Any], k: int = 1) -> list[list[ImageHit]]:
        self.calls += 1
        return [list(self.cases[:k]) for _ in images]
