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
                           (the reference implementation's route, docs/method.md §4)
    GET  /healthz          index loaded, document count, encoder (never needs the API key)
    GET  /metrics          Prometheus text

Every failure is one OpenAI-shaped body, ``{"error": {"message", "type", "code", "param"}}``: bad
input is a 4xx that says what is wrong, a full queue a 503 with ``Retry-After``. Nothing a client
sends can stop the server.

The package is split like vLLM's ``chat_completion/``: :mod:`.schemas` (pydantic requests and
responses), :mod:`.errors` (the error body), :mod:`.requests` (reading and checking requests),
:mod:`.batcher`, :mod:`.metrics`, this module (serving logic, :class:`RetrievalService`, and routes,
:func:`create_app`) and :mod:`.server` (binding the port, running uvicorn).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel
from starlette.responses import Response

from medrwr.config import ServerConfig
from medrwr.retrieval.base import Hit, ImageHit, ImageRetriever, Retriever
from medrwr.retrieval.service.batcher import Batcher, QueueFull
from medrwr.retrieval.service.errors import APIError, bad, install_error_handlers
from medrwr.retrieval.service.metrics import Metrics, MetricsMiddleware
from medrwr.retrieval.service.requests import (
    check_images,
    check_k,
    check_queries,
    decode_images,
    image_request,
    parse,
    read_json,
)
from medrwr.retrieval.service.schemas import (
    ErrorResponse,
    HealthResponse,
    ImageSearchRequest,
    ImageSearchResponse,
    QueriesRequest,
    QueriesResponse,
    SearchRequest,
    SearchResponse,
)

logger = logging.getLogger(__name__)


class RetrievalService:
    """The serving logic behind the routes: request checks, one batcher per mode, metrics.

    Built in the app's lifespan (it needs the running event loop) and kept on ``app.state.service``.
    """

    def __init__(
        self, retriever: Retriever, image_retriever: ImageRetriever | None = None, config: ServerConfig | None = None
    ):
        self.retriever = retriever
        self.image_retriever = image_retriever
        self.config = config or ServerConfig()
        self.metrics = Metrics()
        self.modes = tuple(retriever.modes)
        self.default_mode = retriever.default_mode
        d = retriever.describe()
        self.info = {
            "retriever": type(retriever).__name__,
            "documents": d.get("doc_count"),
            "encoder": d.get("encoder"),
            "index": d.get("path") or d.get("url"),
        }
        self._text_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medrwr-search")
        self._image_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medrwr-image-search")
        self._batchers: dict[str, Batcher] = {}
        self.started_at = time.time()

    # ---------------------------------------------------------------- lifecycle

    async def close(self) -> None:
        """Drain: let every batcher finish its queued jobs, then stop the worker threads."""
        await asyncio.gather(*(b.close() for b in self._batchers.values()))
        self._text_executor.shutdown(wait=True)
        self._image_executor.shutdown(wait=True)

    def _batcher(self, name: str) -> Batcher:
        b = self._batchers.get(name)
        if b is None:
            cfg = self.config
            if name == "image":
                ir = self.image_retriever
                call, executor = (lambda items, k: ir.search_images(items, k=k)), self._image_executor
            else:
                r, mode = self.retriever, name
                call, executor = (lambda items, k: r.search(items, k=k, mode=mode)), self._text_executor
            b = Batcher(name, call, executor, cfg.max_batch_size, cfg.max_wait_ms / 1000.0, cfg.max_queue, self.metrics)
            b.start()
            self._batchers[name] = b
        return b

    @property
    def queued(self) -> int:
        return sum(b.queued for b in self._batchers.values())

    # ---------------------------------------------------------------- checks

    def resolve_mode(self, mode: str | None) -> str:
        if mode is None:
            return self.default_mode
        if mode not in self.modes:
            raise bad(
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
            raise bad(f"the retriever rejected the request: {exc}", "rejected_by_retriever") from None
        except Exception as exc:
            logger.exception("retrieval failed")
            raise APIError(500, f"retrieval failed: {type(exc).__name__}: {exc}", code="retrieval_failed") from None

    async def search(self, queries: list[str], k: int, mode: str | None) -> list[list[Hit]]:
        check_queries(queries, self.config)
        check_k(k, self.config)
        name = self.resolve_mode(mode)
        results = await self._run(name, queries, k)
        self.metrics.queries.labels(name).inc(len(queries))
        return results

    async def search_images(self, images: list[bytes], k: int) -> list[list[ImageHit]]:
        if self.image_retriever is None:
            raise bad(
                "this server has no image index; start it with an image index "
                "(`medrwr serve retrieval --set cdir.image_index=DIR`)",
                "no_image_index",
            )
        check_images(len(images), self.config)
        check_k(k, self.config)
        decoded = await asyncio.to_thread(decode_images, images)
        return await self._run("image", decoded, k)

    def health(self) -> HealthResponse:
        return HealthResponse(
            status="ok",
            **self.info,
            modes=list(self.modes),
            default_mode=self.default_mode,
            image_index=self.image_retriever is not None,
            images=self.image_retriever.doc_count if self.image_retriever is not None else None,
            queued=self.queued,
            uptime_s=round(time.time() - self.started_at, 3),
        )


def _model(model: BaseModel) -> Response:
    """A response serialised by its pydantic model (compact JSON, UTF-8)."""
    return Response(model.model_dump_json(), media_type="application/json")


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


def create_app(
    retriever: Retriever, image_retriever: ImageRetriever | None = None, config: ServerConfig | None = None
) -> FastAPI:
    """Build the FastAPI app serving ``retriever`` and, optionally, ``image_retriever``.

    The :class:`RetrievalService` is built in the lifespan, so its batchers run on the server's loop.
    Raises ValueError when ``config.api_key_env`` names an unset variable (auth would silently be off).
    """
    config = config or ServerConfig()
    if not isinstance(retriever, Retriever):
        raise TypeError(f"retriever must implement medrwr.retrieval.base.Retriever, got {type(retriever).__name__}")
    if image_retriever is not None and not isinstance(image_retriever, ImageRetriever):
        raise TypeError(
            f"image_retriever must implement medrwr.retrieval.base.ImageRetriever, got {type(image_retriever).__name__}"
        )
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
    app.add_middleware(MetricsMiddleware, get_metrics=lambda: holder["service"].metrics if holder else None)
    protected = [Depends(require_key)]

    install_error_handlers(app)

    def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}

    @app.post("/v1/search", dependencies=protected, response_model=SearchResponse, openapi_extra=_body_doc(SearchRequest))
    async def search(request: Request) -> Response:
        t0 = time.perf_counter()
        service = service_of(request)
        req = parse(SearchRequest, await read_json(request, config.max_body_bytes))
        results = await service.search(req.queries, req.k, req.mode)
        took = round((time.perf_counter() - t0) * 1000, 3)
        return _model(SearchResponse.model_validate({"results": results, "took_ms": took}, from_attributes=True))

    @app.post(
        "/v1/search/image",
        dependencies=protected,
        response_model=ImageSearchResponse,
        openapi_extra=_body_doc(ImageSearchRequest),
    )
    async def search_image(request: Request) -> Response:
        t0 = time.perf_counter()
        service = service_of(request)
        images, k = await image_request(request, config)
        results = await service.search_images(images, k)
        took = round((time.perf_counter() - t0) * 1000, 3)
        return _model(ImageSearchResponse.model_validate({"results": results, "took_ms": took}, from_attributes=True))

    @app.post("/queries", dependencies=protected, response_model=QueriesResponse, openapi_extra=_body_doc(QueriesRequest))
    async def queries_compat(request: Request) -> Response:
        service = service_of(request)
        req = parse(QueriesRequest, await read_json(request, config.max_body_bytes))
        results = await service.search(req.queries, req.k, None)
        return _model(QueriesResponse(queries=req.queries, answers=[[h.text for h in hits] for hits in results]))

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz(request: Request) -> Response:
        return _model(service_of(request).health())

    @app.get("/metrics", dependencies=protected)
    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


__all__ = ["RetrievalService", "create_app"]
