"""The batched retrieval HTTP service (``medrwr serve retrieval``).

Why a service: training rollouts fire thousands of queries a minute from many workers. One process
holds the index and the encoder, and merges concurrent requests into one encoder/BM25/FAISS call
(dynamic batching), so throughput grows with concurrency instead of queueing behind a single thread.

Routes (the contract)::

    POST /v1/search        {"queries": [str], "k": int, "mode": "bm25"|"dense"|"hybrid"}
                           -> {"results": [[{doc_id, title, text, score, source}]], "took_ms"}
    POST /v1/search/image  {"images": [base64], "k": int}, or multipart files (field "images") + "k"
                           -> {"results": [[{image_id, image_path, report, score, metadata}]], "took_ms"}
    POST /queries          {"queries": [str], "k": 3} -> {"queries": [...], "answers": [[text]]}
                           (the reference implementation's route, METHOD.md §4)
    GET  /healthz          index loaded, document count, encoder (never needs the API key)
    GET  /metrics          Prometheus text

Every failure is one OpenAI-shaped body, ``{"error": {"message", "type", "code", "param"}}``: bad
input is a 4xx that says what is wrong, a full queue a 503 with ``Retry-After``. Nothing a client
sends can stop the server.

The module is split like vLLM's ``chat_completion/``: schemas, then serving logic
(:class:`RetrievalService`: validation, batching, metrics), then routes (:func:`create_app`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import math
import os
import socket
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from medrwr.config import ServerConfig
from medrwr.errors import PortInUse  # noqa: F401 (re-exported)
from medrwr.retrieval.base import SEARCH_MODES, Hit, ImageHit

logger = logging.getLogger(__name__)

_DRAIN_LIMIT = 16 * 1024 * 1024
"""An oversized body up to this size is read and discarded before the 413 is sent, so the client
sees the answer instead of a connection reset; beyond it the connection is closed."""

# ========================================================================================== schemas


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
    doc_id: str
    title: str
    text: str
    score: float
    source: str


class SearchResponse(BaseModel):
    results: list[list[HitModel]]
    took_ms: float


class ImageHitModel(BaseModel):
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


def _hit_dict(h: Hit) -> dict[str, Any]:
    return {"doc_id": h.doc_id, "title": h.title, "text": h.text, "score": float(h.score), "source": h.source}


def _image_hit_dict(h: ImageHit) -> dict[str, Any]:
    return {
        "image_id": h.image_id,
        "image_path": h.image_path,
        "report": h.report,
        "score": float(h.score),
        "metadata": dict(h.metadata or {}),
    }


# ========================================================================================== errors

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "overloaded_error",
}


class APIError(Exception):
    """An HTTP error answered as ``{"error": {...}}``; ``headers`` adds e.g. Retry-After."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error"),
                "code": self.code,
                "param": self.param,
            }
        }


def _bad(message: str, code: str, param: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


def _validation_message(exc: ValidationError, limit: int = 3) -> tuple[str, str | None]:
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


# ========================================================================================== batching


@dataclass
class _Job:
    items: list[Any]
    k: int
    future: asyncio.Future


class QueueFull(Exception):
    """The batcher's bounded queue cannot take the request."""


class _Batcher:
    """Merge concurrent requests into one retriever call.

    Jobs queue up; the loop takes up to ``max_batch`` items (waiting at most ``max_wait_s`` for more
    while the queue is short), groups them by ``k`` (fusion depth can depend on k, so slicing a
    bigger-k result would not be exact), and runs ``call(items, k)`` on the retriever's single
    worker thread, off the event loop. At most ``max_queue`` items wait; beyond that
    :meth:`submit` raises :class:`QueueFull` instead of growing memory.
    """

    def __init__(
        self,
        name: str,
        call: Callable[[list[Any], int], list[list[Any]]],
        executor: ThreadPoolExecutor,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        metrics: _Metrics,
    ):
        self.name = name
        self._call = call
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._metrics = metrics
        self._pending: deque[_Job] = deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._ema_item_s = 0.01  # running estimate of seconds per item, for Retry-After
        self._last_batch = 0

    @property
    def queued(self) -> int:
        return self._queued

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"medrwr-batcher-{self.name}")

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained: what a turned-away client should wait."""
        return max(1, math.ceil(self._queued * self._ema_item_s))

    def submit(self, items: list[Any], k: int) -> asyncio.Future:
        if self._closing:
            raise APIError(
                503, "the server is shutting down; retry on another replica or later", code="shutting_down",
                headers={"Retry-After": "1"},
            )
        if self._queued + len(items) > self.max_queue:
            raise QueueFull()
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(list(items), k, fut))
        self._queued += len(items)
        self._metrics.queue_depth.labels(self.name).set(self._queued)
        self._wakeup.set()
        return fut

    async def close(self) -> None:
        """Finish every queued job, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def _wait(self, timeout: float | None) -> bool:
        self._wakeup.clear()
        try:
            if timeout is None:
                await self._wakeup.wait()
            else:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wait(None)
                continue
            # Wait for company only under concurrency: if the last batch was a lone request, a
            # lone request now is most likely a single sequential client, and waiting only adds latency.
            if self._queued < self.max_batch and self.max_wait_s > 0 and not self._closing and (
                self._last_batch > 1 or self._queued > 1
            ):
                deadline = loop.time() + self.max_wait_s
                while self._queued < self.max_batch and not self._closing:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or not await self._wait(remaining):
                        break
            batch = [self._pending.popleft()]
            n = len(batch[0].items)
            while self._pending and n + len(self._pending[0].items) <= self.max_batch:
                job = self._pending.popleft()
                batch.append(job)
                n += len(job.items)
            self._queued -= n
            self._last_batch = n
            self._metrics.queue_depth.labels(self.name).set(self._queued)
            try:
                await self._execute(batch)
            except Exception:  # pragma: no cover - _execute resolves every future itself
                logger.exception("batcher %s failed; continuing", self.name)

    async def _execute(self, batch: list[_Job]) -> None:
        by_k: dict[int, list[_Job]] = {}
        for job in batch:
            by_k.setdefault(job.k, []).append(job)
        for k, jobs in by_k.items():
            items = [it for job in jobs for it in job.items]
            try:
                results = await self._search(items, k)
            except Exception as exc:
                if len(jobs) == 1:
                    _resolve(jobs[0].future, exc=exc)
                    continue
                # One bad request must not fail its neighbours: retry each job on its own.
                logger.warning("batch of %d requests failed (%s); retrying them one by one", len(jobs), exc)
                for job in jobs:
                    try:
                        _resolve(job.future, await self._search(job.items, k))
                    except Exception as exc2:
                        _resolve(job.future, exc=exc2)
                continue
            start = 0
            for job in jobs:
                _resolve(job.future, results[start : start + len(job.items)])
                start += len(job.items)

    async def _search(self, items: list[Any], k: int) -> list[list[Any]]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        results = await loop.run_in_executor(self._executor, self._call, items, k)
        dt = time.perf_counter() - t0
        if not isinstance(results, list) or len(results) != len(items):
            got = len(results) if isinstance(results, list) else type(results).__name__
            raise RuntimeError(f"retriever returned {got} result lists for {len(items)} inputs")
        self._metrics.batch_size.labels(self.name).observe(len(items))
        self._metrics.batch_seconds.labels(self.name).observe(dt)
        self._ema_item_s = 0.8 * self._ema_item_s + 0.2 * (dt / max(1, len(items)))
        return results


def _resolve(fut: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():  # the client went away and the request was cancelled
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


# ========================================================================================== serving


class _Metrics:
    """Prometheus metrics on a registry of this app's own (several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "medrwr_retrieval_requests", "HTTP requests by route, method and status", ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "medrwr_retrieval_request_seconds", "Request latency by route", ["route"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.queue_depth = Gauge(
            "medrwr_retrieval_queue_depth", "Queries (or images) waiting for a batch", ["batcher"], registry=r
        )
        self.batch_size = Histogram(
            "medrwr_retrieval_batch_size", "Items per retriever call", ["batcher"], registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.batch_seconds = Histogram(
            "medrwr_retrieval_batch_seconds", "Seconds per retriever call", ["batcher"], registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.queries = Counter("medrwr_retrieval_queries", "Queries answered, by mode", ["mode"], registry=r)
        self.rejected = Counter(
            "medrwr_retrieval_rejected", "Requests turned away because the queue was full", ["batcher"], registry=r
        )

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _retriever_modes(retriever: Any) -> tuple[str, ...]:
    modes = getattr(retriever, "modes", None) or getattr(retriever, "available_modes", None)
    if callable(modes):
        modes = modes()
    if not modes:
        return tuple(SEARCH_MODES)
    return tuple(m for m in SEARCH_MODES if m in set(modes))


def _retriever_default_mode(retriever: Any, modes: Sequence[str]) -> str:
    mode = getattr(retriever, "default_mode", None) or getattr(getattr(retriever, "config", None), "mode", None)
    if mode in modes:
        return str(mode)
    return "hybrid" if "hybrid" in modes else modes[0]


def _first_attr(obj: Any, names: Sequence[str]) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if callable(value) and not isinstance(value, (str, int)):
            try:
                value = value()
            except TypeError:
                continue
        if value is not None:
            return value
    return None


def describe_retriever(retriever: Any) -> dict[str, Any]:
    """What /healthz reports about a retriever: document count, encoder, index path (best effort).

    Reads the index manifest first and never touches a lazily loaded encoder.
    """
    docs = _first_attr(retriever, ("doc_count", "num_documents", "num_docs", "n_docs"))
    if docs is None:
        with contextlib.suppress(TypeError):
            docs = len(retriever)
    if docs is None:
        with contextlib.suppress(TypeError):
            docs = len(getattr(retriever, "docs", None))  # type: ignore[arg-type]
    encoder = None
    manifest = getattr(retriever, "manifest", None)
    if isinstance(manifest, dict):
        encoder = manifest.get("encoder")
        if isinstance(encoder, dict):
            encoder = encoder.get("name") or encoder.get("spec")
    if encoder is None:
        encoder = _first_attr(retriever, ("encoder_name",))
    path = getattr(retriever, "path", None) or getattr(retriever, "index_path", None)
    return {
        "retriever": type(retriever).__name__,
        "documents": int(docs) if docs is not None else None,
        "encoder": str(encoder) if encoder is not None else None,
        "index": str(path) if path is not None else None,
    }


class RetrievalService:
    """The serving logic behind the routes: request checks, one batcher per mode, metrics.

    Built in the app's lifespan (it needs the running event loop) and kept on ``app.state.service``.
    """

    def __init__(self, retriever: Any, image_retriever: Any = None, config: ServerConfig | None = None):
        self.retriever = retriever
        self.image_retriever = image_retriever
        self.config = config or ServerConfig()
        self.metrics = _Metrics()
        self.modes = _retriever_modes(retriever)
        self.default_mode = _retriever_default_mode(retriever, self.modes)
        self.info = describe_retriever(retriever)
        self._text_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medrwr-search")
        self._image_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medrwr-image-search")
        self._batchers: dict[str, _Batcher] = {}
        self.started_at = time.time()

    # ---------------------------------------------------------------- lifecycle

    async def close(self) -> None:
        """Drain: let every batcher finish its queued jobs, then stop the worker threads."""
        await asyncio.gather(*(b.close() for b in self._batchers.values()))
        self._text_executor.shutdown(wait=True)
        self._image_executor.shutdown(wait=True)

    def _batcher(self, name: str) -> _Batcher:
        b = self._batchers.get(name)
        if b is None:
            cfg = self.config
            if name == "image":
                ir = self.image_retriever
                call, executor = (lambda items, k: ir.search_images(items, k=k)), self._image_executor
            else:
                r, mode = self.retriever, name
                call, executor = (lambda items, k: r.search(items, k=k, mode=mode)), self._text_executor
            b = _Batcher(name, call, executor, cfg.max_batch_size, cfg.max_wait_ms / 1000.0, cfg.max_queue, self.metrics)
            b.start()
            self._batchers[name] = b
        return b

    @property
    def queued(self) -> int:
        return sum(b.queued for b in self._batchers.values())

    # ---------------------------------------------------------------- checks

    def check_queries(self, queries: list[str]) -> None:
        cfg = self.config
        if not queries:
            raise _bad("'queries' is empty: send at least one query", "empty_queries", "queries")
        if len(queries) > cfg.max_queries_per_request:
            raise _bad(
                f"too many queries in one request: {len(queries)} > {cfg.max_queries_per_request} "
                "(server.max_queries_per_request); split the batch",
                "too_many_queries",
                "queries",
            )
        for i, q in enumerate(queries):
            if len(q) > cfg.max_query_chars:
                raise _bad(
                    f"queries[{i}] has {len(q)} characters; the limit is {cfg.max_query_chars} "
                    "(server.max_query_chars)",
                    "query_too_long",
                    f"queries[{i}]",
                )
            if not q.strip():
                raise _bad(f"queries[{i}] is empty or whitespace only", "empty_query", f"queries[{i}]")

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.config.max_k:
            raise _bad(f"k must be between 1 and {self.config.max_k} (server.max_k), got {k}", "k_out_of_range", "k")

    def resolve_mode(self, mode: str | None) -> str:
        if mode is None:
            return self.default_mode
        if mode not in self.modes:
            raise _bad(
                f"mode '{mode}' is not available for this index (available: {', '.join(self.modes)}); "
                "a dense or hybrid mode needs an index built with embeddings",
                "mode_unavailable",
                "mode",
            )
        return mode

    # ---------------------------------------------------------------- work

    async def _run(self, name: str, items: list[Any], k: int) -> list[list[Any]]:
        batcher = self._batcher(name)
        try:
            fut = batcher.submit(items, k)
        except QueueFull:
            self.metrics.rejected.labels(name).inc()
            wait = batcher.retry_after_s()
            raise APIError(
                503,
                f"the server is busy: {batcher.queued} items are queued (server.max_queue={batcher.max_queue}); "
                f"retry after {wait} s",
                code="queue_full",
                headers={"Retry-After": str(wait)},
            ) from None
        try:
            return await fut
        except APIError:
            raise
        except (ValueError, TypeError) as exc:
            # Our retrievers raise ValueError for input they cannot handle: the caller's fault.
            raise _bad(f"the retriever rejected the request: {exc}", "rejected_by_retriever") from None
        except Exception as exc:
            logger.exception("retrieval failed")
            raise APIError(500, f"retrieval failed: {type(exc).__name__}: {exc}", code="retrieval_failed") from None

    async def search(self, queries: list[str], k: int, mode: str | None) -> list[list[Hit]]:
        self.check_queries(queries)
        self.check_k(k)
        name = self.resolve_mode(mode)
        results = await self._run(name, queries, k)
        self.metrics.queries.labels(name).inc(len(queries))
        return results

    async def search_images(self, images: list[bytes], k: int) -> list[list[ImageHit]]:
        if self.image_retriever is None:
            raise _bad(
                "this server has no image index; start it with an image index "
                "(`medrwr serve retrieval --set cdir.image_index=DIR`)",
                "no_image_index",
            )
        cfg = self.config
        if not images:
            raise _bad("'images' is empty: send at least one image", "empty_images", "images")
        if len(images) > cfg.max_images_per_request:
            raise _bad(
                f"too many images in one request: {len(images)} > {cfg.max_images_per_request} "
                "(server.max_images_per_request)",
                "too_many_images",
                "images",
            )
        self.check_k(k)
        decoded = await asyncio.to_thread(_decode_images, images)
        return await self._run("image", decoded, k)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            **self.info,
            "modes": list(self.modes),
            "default_mode": self.default_mode,
            "image_index": self.image_retriever is not None,
            "images": describe_retriever(self.image_retriever)["documents"] if self.image_retriever else None,
            "queued": self.queued,
            "uptime_s": round(time.time() - self.started_at, 3),
        }


def _decode_images(images: list[bytes]) -> list[Any]:
    """Decode every image fully now, so a corrupt one is a 400 naming it, not a failed batch."""
    from PIL import Image

    out = []
    for i, data in enumerate(images):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                img.load()
        except Exception as exc:  # PIL raises many types for corrupt input; all are the client's fault
            kind = "not a recognised image format" if "cannot identify" in str(exc) else f"{type(exc).__name__}: {exc}"
            raise _bad(f"images[{i}] could not be decoded as an image ({kind})", "invalid_image", f"images[{i}]") from None
        out.append(img)
    return out


def _b64_image(s: str, i: int) -> bytes:
    if s.startswith("data:"):
        _, _, s = s.partition(",")
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"images[{i}] is not valid base64 ({exc})", "invalid_base64", f"images[{i}]") from None


# ========================================================================================== routes


async def _read_body(request: Any, limit: int) -> bytes:
    """Read the body, refusing more than ``limit`` bytes (Content-Length first, then while streaming).

    An oversized body up to :data:`_DRAIN_LIMIT` is read and dropped before answering 413, so the
    client gets the answer rather than a reset connection; a bigger one is refused unread.
    """
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    n_declared = None
    if declared is not None:
        try:
            n_declared = int(declared)
        except ValueError:
            raise _bad(f"invalid Content-Length header {declared!r}", "invalid_content_length") from None
    size = n_declared or 0
    over = n_declared is not None and n_declared > limit
    if not over or n_declared <= _DRAIN_LIMIT:
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    over = True
                    chunks.clear()
                    if size > _DRAIN_LIMIT:
                        break
                    continue
                chunks.append(chunk)
        except ClientDisconnect:
            raise _bad("the client disconnected while sending the body", "client_disconnected") from None
    if over:
        raise APIError(
            413,
            f"request body is {max(size, n_declared or 0)} bytes; the limit is {limit} bytes "
            "(server.max_body_bytes): send fewer or shorter queries",
            code="body_too_large",
        )
    return b"".join(chunks)


async def _read_json(request: Any, limit: int) -> dict[str, Any]:
    body = await _read_body(request, limit)
    if not body.strip():
        raise _bad("the request body is empty; send a JSON object", "empty_body")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(f"the request body is not valid JSON: {exc}", "invalid_json") from None
    except RecursionError:
        raise _bad("the request body is not valid JSON: nested too deeply", "invalid_json") from None
    if not isinstance(data, dict):
        raise _bad(f"the request body must be a JSON object, got {type(data).__name__}", "invalid_body")
    return data


def _parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = _validation_message(exc)
        raise _bad(message, "invalid_parameter", param) from None


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return Response(body, status_code=status, media_type="application/json", headers=headers)


class _MetricsMiddleware:
    """Pure ASGI: count requests by route template + status and time them (cheap, no BaseHTTPMiddleware)."""

    def __init__(self, app: Any, get_metrics: Callable[[], _Metrics | None]):
        self.app = app
        self._get_metrics = get_metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics = self._get_metrics()
            if metrics is not None:
                route = scope.get("route")
                label = getattr(route, "path", None) or "unmatched"
                metrics.requests.labels(label, scope.get("method", ""), str(status[0])).inc()
                metrics.latency.labels(label).observe(time.perf_counter() - t0)


def _api_key(config: ServerConfig) -> str | None:
    if not config.api_key_env:
        return None
    key = os.environ.get(config.api_key_env, "")
    if not key:
        raise ValueError(
            f"server.api_key_env is {config.api_key_env!r} but that environment variable is empty or unset; "
            f"export {config.api_key_env}=<token>, or drop --api-key-env to run without a key"
        )
    return key


def create_app(retriever: Any, image_retriever: Any = None, config: ServerConfig | None = None) -> FastAPI:
    """Build the FastAPI app serving ``retriever`` (any object with ``.search``) and, optionally,
    ``image_retriever`` (any object with ``.search_images``).

    The :class:`RetrievalService` is built in the lifespan, so its batchers run on the server's loop.
    Raises ValueError when ``config.api_key_env`` names an unset variable (auth would silently be off).
    """
    config = config or ServerConfig()
    if not callable(getattr(retriever, "search", None)):
        raise TypeError(f"retriever must have a .search(queries, k, mode) method, got {type(retriever).__name__}")
    if image_retriever is not None and not callable(getattr(image_retriever, "search_images", None)):
        raise TypeError(f"image_retriever must have a .search_images(images, k) method, got {type(image_retriever).__name__}")
    api_key = _api_key(config)
    holder: dict[str, RetrievalService] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service = RetrievalService(retriever, image_retriever, config)
        app.state.service = service
        holder["service"] = service
        logger.info("retrieval service ready: %s", service.info)
        try:
            yield
        finally:
            await service.close()
            logger.info("retrieval service stopped")

    def service_of(request: Request) -> RetrievalService:
        return request.app.state.service

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                401,
                "missing API key: send the header 'Authorization: Bearer <key>'",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(
        title="MedRwR retrieval service",
        version="1",
        lifespan=lifespan,
        responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    app.add_middleware(_MetricsMiddleware, get_metrics=lambda: holder["service"].metrics if holder else None)
    protected = [Depends(require_key)]

    async def on_api_error(request: Request, exc: APIError) -> Response:
        return _json(exc.body(), exc.status, exc.headers)

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.url.path}; routes: /v1/search, /v1/search/image, /queries, /healthz, /metrics"
        err = APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {}))
        return _json(err.body(), err.status, err.headers)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        err = _bad("; ".join(str(e.get("msg")) for e in exc.errors()[:3]) or "invalid request", "invalid_parameter")
        return _json(err.body(), 400)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        err = APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")
        return _json(err.body(), 500)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)

    def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}

    @app.post("/v1/search", dependencies=protected, response_model=SearchResponse, openapi_extra=_body_doc(SearchRequest))
    async def search(request: Request) -> Response:
        t0 = time.perf_counter()
        service = service_of(request)
        req = _parse(SearchRequest, await _read_json(request, config.max_body_bytes))
        results = await service.search(req.queries, req.k, req.mode)
        out = [[_hit_dict(h) for h in hits] for hits in results]
        return _json({"results": out, "took_ms": round((time.perf_counter() - t0) * 1000, 3)})

    @app.post(
        "/v1/search/image",
        dependencies=protected,
        response_model=ImageSearchResponse,
        openapi_extra=_body_doc(ImageSearchRequest),
    )
    async def search_image(request: Request) -> Response:
        t0 = time.perf_counter()
        service = service_of(request)
        images, k = await _image_request(request, config)
        results = await service.search_images(images, k)
        out = [[_image_hit_dict(h) for h in hits] for hits in results]
        return _json({"results": out, "took_ms": round((time.perf_counter() - t0) * 1000, 3)})

    @app.post("/queries", dependencies=protected, response_model=QueriesResponse, openapi_extra=_body_doc(QueriesRequest))
    async def queries_compat(request: Request) -> Response:
        service = service_of(request)
        req = _parse(QueriesRequest, await _read_json(request, config.max_body_bytes))
        results = await service.search(req.queries, req.k, None)
        return _json({"queries": req.queries, "answers": [[h.text for h in hits] for hits in results]})

    @app.get("/healthz")
    async def healthz(request: Request) -> Response:
        return _json(service_of(request).health())

    @app.get("/metrics", dependencies=protected)
    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _image_request(request: Any, config: ServerConfig) -> tuple[list[bytes], int]:
    """Images and k from a JSON body (base64) or a multipart form (files + optional ``k`` field)."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        from starlette.datastructures import UploadFile

        body = await _read_body(request, config.max_body_bytes)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=config.max_images_per_request + 1, max_fields=16, max_part_size=config.max_body_bytes
            )
        except Exception as exc:
            detail = getattr(exc, "detail", None) or str(exc)
            raise _bad(f"could not parse the multipart form: {detail}", "invalid_multipart") from None
        images: list[bytes] = []
        k_raw: Any = 1
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                images.append(await value.read())
            elif key == "k":
                k_raw = value
        try:
            k = int(k_raw)
        except (TypeError, ValueError):
            raise _bad(f"form field 'k' must be an integer, got {k_raw!r}", "invalid_parameter", "k") from None
        if not images:
            raise _bad("the multipart form has no files; attach images as file fields named 'images'", "empty_images")
        return images, k
    req = _parse(ImageSearchRequest, await _read_json(request, config.max_body_bytes))
    if len(req.images) > config.max_images_per_request:
        raise _bad(
            f"too many images in one request: {len(req.images)} > {config.max_images_per_request} "
            "(server.max_images_per_request)",
            "too_many_images",
            "images",
        )
    return [_b64_image(s, i) for i, s in enumerate(req.images)], req.k


# ========================================================================================== running


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves so a taken port is a clear error (and port 0 works)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            err = PortInUse(f"port {port} on {host} is already in use: stop the other server or pick another with --port")
            err.errno = exc.errno
            raise err from None
        raise OSError(exc.errno, f"cannot bind {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_uvicorn_server(app: Any, config: ServerConfig, log_level: str = "warning") -> Any:
    """A uvicorn.Server for ``app`` with our settings (graceful shutdown, no access log)."""
    import uvicorn

    ucfg = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=config.graceful_shutdown_s,
        backlog=2048,
        timeout_keep_alive=30,
        lifespan="on",
    )
    return uvicorn.Server(ucfg)


def serve(
    index_path: str | os.PathLike | None = None,
    *,
    config: Any = None,
    retriever: Any = None,
    image_retriever: Any = None,
    image_index: str | os.PathLike | None = None,
    log_level: str = "warning",
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Load the index at ``index_path`` (default: the shipped KB) and serve it until interrupted.

    ``config`` is a full :class:`medrwr.config.Config` (its ``server`` and ``retrieval`` sections are
    used) or a :class:`ServerConfig`. ``on_ready(url)`` is called once the socket is bound.
    """
    from medrwr.config import Config

    full = config if isinstance(config, Config) else Config(server=config or ServerConfig())
    scfg = full.server
    sock = bind_socket(scfg.host, scfg.port)  # fail fast, before loading a large index
    try:
        if retriever is None:
            retriever = load_retriever(index_path, full)
        if image_retriever is None:
            image_index = image_index or full.cdir.image_index
            if image_index:
                from medrwr.retrieval.index.images import ImageIndex

                image_retriever = ImageIndex.load(image_index)
        if callable(getattr(retriever, "warmup", None)):
            t0 = time.perf_counter()
            retriever.warmup()  # load the encoder now, not on the first request
            logger.info("retriever warmed up in %.1fs", time.perf_counter() - t0)
        app = create_app(retriever, image_retriever, scfg)
        server = make_uvicorn_server(app, scfg, log_level=log_level)
        url = f"http://{_url_host(scfg.host)}:{sock.getsockname()[1]}"
        logger.info("serving retrieval at %s", url)
        if on_ready is not None:
            on_ready(url)
        server.run(sockets=[sock])
    finally:
        sock.close()


def load_retriever(index_path: str | os.PathLike | None, config: Any = None) -> Any:
    """The in-process hybrid retriever for ``index_path`` (None: the shipped default KB)."""
    from medrwr.retrieval.index.hybrid import HybridRetriever

    if index_path is None:
        from medrwr.kb.default import ensure_default_index

        index_path = ensure_default_index()
    path = Path(index_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"index directory {path} does not exist; build one with `medrwr index build --corpus PATH --out {path}`"
        )
    rcfg = getattr(config, "retrieval", None)
    return HybridRetriever.load(path, config=rcfg)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


__all__ = [
    "APIError",
    "ErrorResponse",
    "ImageSearchRequest",
    "ImageSearchResponse",
    "PortInUse",
    "QueriesRequest",
    "QueriesResponse",
    "RetrievalService",
    "SearchRequest",
    "SearchResponse",
    "bind_socket",
    "create_app",
    "describe_retriever",
    "load_retriever",
    "make_uvicorn_server",
    "serve",
]
