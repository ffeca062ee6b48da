"""The HTTP contract of the retrieval service as pydantic models: requests, responses, error bodies.

Requests are parsed into these models (shape and types only; the limits live in
:mod:`medrwr.retrieval.service.requests`), and every response is serialised through its model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError


class SearchRequest(BaseModel):
    """``POST /v1/search``. ``mode`` None uses the index's default mode."""

    model_config = ConfigDict(extra="forbid")

    queries: list[StrictStr]
    k: StrictInt = 3
    mode: Literal["bm25", "dense", "hybrid"] | None = None


class QueriesRequest(BaseModel):
    """``POST /queries``, the reference implementation's request (extra keys are ignored)."""

    model_config = ConfigDict(extra="ignore")

    queries: list[StrictStr]
    k: StrictInt = 3


class ImageSearchRequest(BaseModel):
    """``POST /v1/search/image`` as JSON: base64 images (``data:`` URLs accepted)."""

    model_config = ConfigDict(extra="forbid")

    images: list[StrictStr]
    k: StrictInt = 1


class HitModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    doc_id: str
    title: str
    text: str
    score: float
    source: str


class SearchResponse(BaseModel):
    results: list[list[HitModel]]
    took_ms: float


class ImageHitModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    image_id: str
    image_path: str
    report: str
    score: float
    metadata: dict[str, Any] = {}


class ImageSearchResponse(BaseModel):
    results: list[list[ImageHitModel]]
    took_ms: float


class QueriesResponse(BaseModel):
    queries: list[str]
    answers: list[list[str]]


class ErrorInfo(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class HealthResponse(BaseModel):
    """``GET /healthz``: what is loaded; never needs the API key."""

    status: str
    retriever: str
    documents: int | None
    encoder: str | None
    index: str | None
    modes: list[str]
    default_mode: str
    image_index: bool
    images: int | None
    queued: int
    uptime_s: float


def validation_message(exc: ValidationError, limit: int = 3) -> tuple[str, str | None]:
    """Turn pydantic's errors into one readable sentence naming the fields (``queries[2]: ...``)."""
    parts = []
    errors = exc.errors(include_url=False)
    first_param = None
    for err in errors[:limit]:
        loc = ""
        for item in err.get("loc", ()):
            loc += f"[{item}]" if isinstance(item, int) else (f".{item}" if loc else str(item))
        first_param = first_param or loc or None
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (valid fields: see the API docs at /docs)"
        elif err.get("type") == "missing":
            msg = "field required"
        parts.append(f"{loc or 'body'}: {msg}")
    if len(errors) > limit:
        parts.append(f"... and {len(errors) - limit} more errors")
    return "; ".join(parts), first_param


__all__ = [
    "ErrorInfo",
    "ErrorResponse",
    "HealthResponse",
    "HitModel",
    "ImageHitModel",
    "ImageSearchRequest",
    "ImageSearchResponse",
    "QueriesRequest",
    "QueriesResponse",
    "SearchRequest",
    "SearchResponse",
    "validation_message",
]
