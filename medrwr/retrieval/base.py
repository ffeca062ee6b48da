"""The interfaces every retriever implements, and a fake beside each (as httpx ships MockTransport).

The rollout engine, the server and the evaluation harness only see these protocols, so an in-process
hybrid index, the HTTP client and the Ray-sharded router are interchangeable.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

from medrwr.errors import BadRetrievalResponse, RetrievalError, RetrievalTimeout, RetrievalUnavailable  # noqa: F401 (re-exported)

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
    """Validate ``search`` arguments shared by every retriever (in-process, sharded, HTTP); returns the queries as a list."""
    if isinstance(queries, str):
        raise TypeError("search() takes a list of queries; wrap a single query as [query]")
    queries = list(queries)
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise TypeError(f"queries[{i}] must be a string, got {type(q).__name__}")
    if not isinstance(k, numbers.Integral) or k < 1:  # numpy integers are Integral too
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return queries


@runtime_checkable
class Retriever(Protocol):
    """Batched text retrieval.

    ``search(queries, k)`` returns one list of at most ``k`` hits per query, in query order, best first.
    It raises :class:`RetrievalError` (or a subclass) when the backend fails; callers such as the
    rollout engine record the failure instead of crashing.
    """

    def search(self, queries: Sequence[str], k: int = 3, mode: SearchMode | None = None) -> list[list[Hit]]: ...


@runtime_checkable
class ImageRetriever(Protocol):
    """Batched image-to-(image, report) retrieval; ``images`` are PIL images, paths or raw bytes."""

    def search_images(self, images: Sequence[Any], k: int = 1) -> list[list[ImageHit]]: ...


class FakeRetriever:
    """A deterministic in-memory retriever for tests and examples.

    ``docs`` maps doc_id -> text. Scores are word-overlap counts; ties break by doc_id. Set
    ``fail_with`` to an exception to make every call raise it (to test failure handling).
    """

    def __init__(self, docs: dict[str, str], fail_with: Exception | None = None):
        self.docs = dict(docs)
        self.fail_with = fail_with
        self.calls: list[list[str]] = []

    def search(self, queries: Sequence[str], k: int = 3, mode: SearchMode | None = None) -> list[list[Hit]]:
        self.calls.append(list(queries))
        if self.fail_with is not None:
            raise self.fail_with
        results = []
        for q in queries:
            words = set(q.lower().split())
            scored = sorted(
                ((len(words & set(t.lower().split())), doc_id, t) for doc_id, t in self.docs.items()),
                key=lambda x: (-x[0], x[1]),
            )
            results.append([Hit(doc_id, t, score=float(s), source="fake") for s, doc_id, t in scored[:k] if s > 0])
        return results


class FakeImageRetriever:
    """Returns the same scripted cases for every image; records calls."""

    def __init__(self, cases: Sequence[ImageHit]):
        self.cases = list(cases)
        self.calls = 0

    def search_images(self, images: Sequence[Any], k: int = 1) -> list[list[ImageHit]]:
        self.calls += 1
        return [list(self.cases[:k]) for _ in images]
