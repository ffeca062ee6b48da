"""The OpenAI-compatible chat API over the whole loop (``medrwr serve api``; contract in docs/serving.md).

Routes::

    POST /v1/chat/completions   OpenAI chat schema (+ medrwr_options, medrwr_cdir); stream or not
    GET  /v1/models             the served policy
    GET  /healthz               status, queue, draining (never needs the API key)
    GET  /metrics               Prometheus text
    GET  /, /<file>             the web page (medrwr/serve/web/), when installed

As in the retrieval service (:mod:`medrwr.retrieval.service.app`, whose error shape, body limit and metrics
middleware this reuses): the serving logic (:class:`ChatService`) is built in the lifespan and kept on
``app.state``; every failure is one ``{"error": {...}}`` body; a full queue is a 429 and a draining server a 503,
both with ``Retry-After``; shutting down drains the scheduler (queued and running requests finish).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from medrwr.config import CDIRConfig, RolloutConfig, ServerConfig
from medrwr.errors import BackendError, MedRwRError
from medrwr.retrieval.service.errors import APIError, install_error_handlers, json_response
from medrwr.retrieval.service.metrics import MetricsMiddleware
from medrwr.retrieval.service.requests import parse, read_json
from medrwr.rollout.engine import RolloutEngine
from medrwr.serve.api.metrics import APIMetrics
from medrwr.serve.api.requests import ChatInput, check_chat, decode_images
from medrwr.serve.api.scheduler import Draining, Job, QueueFull, Scheduler
from medrwr.serve.api.schemas import ChatRequest
from medrwr.serve.api.streaming import ChunkWriter
from medrwr.serve.api.views import completion_body, finish_reason, trace_view, usage

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
_POLL_S = 0.5


class ChatService:
    """Checks requests, hands them to the :class:`Scheduler`, turns its events into responses."""

    def __init__(self, engine: RolloutEngine, config: ServerConfig, model_name: str, drop_images: bool = False):
        self.engine = engine
        self.drop_images = drop_images
        self.config = config
        self.rollout: RolloutConfig = engine.config
        self.cdir: CDIRConfig = engine.cdir
        self.model_name = model_name
        self.metrics = APIMetrics()
        self.scheduler = Scheduler(engine, max_queue=config.api_max_queue, max_batch=config.api_max_batch,
                                   wait_ms=config.api_batch_wait_ms, metrics=self.metrics)
        self.started_at = time.time()

    async def prepare(self, request: Request) -> ChatInput:
        req = parse(ChatRequest, await read_json(request, self.config.max_body_bytes))
        chat, urls = check_chat(
            req, self.config, self.rollout, supports_images=bool(self.engine.backend.supports_images),
            has_image_index=self.engine.image_retriever is not None, cdir_default=self.cdir.enabled,
            drop_images=self.drop_images,
        )
        if urls:
            chat.images = await asyncio.to_thread(decode_images, urls, self.config, self.rollout)
        return chat

    def submit(self, chat: ChatInput, rid: str) -> Job:
        try:
            return self.scheduler.submit(chat, rid)
        except QueueFull:
            self.metrics.rejected.labels("queue_full").inc()
            wait = self.scheduler.retry_after_s()
            raise APIError(429, f"the server is busy: {self.scheduler.queued} requests are queued "
                           f"(server.api_max_queue={self.config.api_max_queue}); retry after {wait} s",
                           code="queue_full", headers={"Retry-After": str(wait)}) from None
        except Draining:
            self.metrics.rejected.labels("draining").inc()
            raise APIError(503, "the server is shutting down; retry on another instance or later",
                           code="draining", headers={"Retry-After": "5"}) from None

    def error_of(self, exc: Exception) -> APIError:
        """An engine failure as an API error: the request's fault (4xx) or ours (500)."""
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, (BackendError, ValueError, TypeError, MedRwRError)):
            return APIError(400, f"the policy could not run this request: {exc}", code="rollout_rejected")
        return APIError(500, f"rollout failed: {type(exc).__name__}", code="rollout_failed")

    async def complete(self, request: Request, job: Job) -> Response:
        """Wait for the job (watching for a client that goes away) and answer the whole completion."""
        while True:
            try:
                item = await asyncio.wait_for(job.events.get(), _POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    self.metrics.cancelled.inc()
                    return Response(status_code=499)
                continue
            if item[0] == "done":
                body = completion_body(job.request_id, int(time.time()), self.model_name, item[1])
                return json_response(body)
            if item[0] == "error":
                raise self.error_of(item[1])

    async def stream(self, job: Job):
        """The SSE frames of a streamed completion (docs/serving.md, streaming contract)."""
        w = ChunkWriter(job.request_id, int(time.time()), self.model_name)
        finished = False
        try:
            for i in range(job.chat.n):
                yield w.role(i)
            while True:
                item = await job.events.get()
                kind = item[0]
                if kind == "text":
                    yield w.reasoning(item[1], item[2])
                elif kind == "event":
                    yield w.event(item[1], item[2], item[3])
                elif kind == "error":
                    yield w.error(self.error_of(item[1]).body())
                    break
                elif kind == "done":
                    traces = item[1]
                    for i, t in enumerate(traces):
                        yield w.event(i, "medrwr.trace", trace_view(t))
                        if t.answer:
                            yield w.content(i, t.answer)
                    for i, t in enumerate(traces):
                        last = i == len(traces) - 1
                        yield w.finish(i, finish_reason(t), usage(traces) if last else None)
                    break
            finished = True
            yield w.DONE
        finally:
            if not finished:
                job.cancelled = True
                self.metrics.cancelled.inc()

    def health(self) -> dict[str, Any]:
        ir = self.engine.image_retriever
        r = self.engine.retriever
        return {
            "status": "draining" if self.scheduler.draining else "ok",
            "model": self.model_name,
            "retriever": type(r).__name__ if r is not None else None,
            "documents": r.doc_count if r is not None else None,
            "image_index": ir is not None,
            "supports_images": bool(self.engine.backend.supports_images),
            "cdir_default": self.cdir.enabled,
            "queued": self.scheduler.queued,
            "uptime_s": round(time.time() - self.started_at, 3),
        }


def _api_key(config: ServerConfig) -> str | None:
    if not config.api_key_env:
        return None
    key = os.environ.get(config.api_key_env, "")
    if not key:
        raise ValueError(f"server.api_key_env is {config.api_key_env!r} but that environment variable is empty or "
                         f"unset; export {config.api_key_env}=<token>, or drop --api-key-env")
    return key


def create_app(engine: RolloutEngine, config: ServerConfig | None = None, *, model_name: str = "medrwr",
               web_dir: Path | None = WEB_DIR, drop_images: bool = False) -> FastAPI:
    """The FastAPI app serving ``engine`` (one :class:`ChatService`, built in the lifespan). ``drop_images``:
    images sent to a text-only policy are ignored with a warning (``medrwr demo``) instead of a 400."""
    config = config or ServerConfig()
    api_key = _api_key(config)
    holder: dict[str, ChatService] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service = ChatService(engine, config, model_name, drop_images)
        service.scheduler.start()
        app.state.service = holder["service"] = service
        try:
            yield
        finally:
            await service.scheduler.close()
            logger.info("chat API stopped (drained)")

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="MedRwR chat API", version="1", lifespan=lifespan)
    app.add_middleware(MetricsMiddleware, get_metrics=lambda: holder["service"].metrics if holder else None)
    install_error_handlers(app)

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (f"no route {request.url.path}; routes: POST /v1/chat/completions, GET /v1/models, "
                       "/healthz, /metrics, / (web page)")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {}))
        return json_response(err.body(), err.status, err.headers)

    app.add_exception_handler(StarletteHTTPException, on_http_error)
    protected = [Depends(require_key)]

    @app.post("/v1/chat/completions", dependencies=protected)
    async def chat_completions(request: Request) -> Response:
        service: ChatService = request.app.state.service
        chat = await service.prepare(request)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        job = service.submit(chat, rid)
        if chat.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(service.stream(job), media_type="text/event-stream", headers=headers)
        return await service.complete(request, job)

    @app.get("/v1/models", dependencies=protected)
    async def models(request: Request) -> Response:
        service: ChatService = request.app.state.service
        return json_response({"object": "list", "data": [
            {"id": service.model_name, "object": "model", "created": int(service.started_at), "owned_by": "medrwr"}]})

    @app.get("/healthz")
    async def healthz(request: Request) -> Response:
        return json_response(request.app.state.service.health())

    @app.get("/metrics", dependencies=protected)
    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(request.app.state.service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if web_dir is not None and (web_dir / "index.html").is_file():
        from starlette.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=str(web_dir), html=True), name="web")
    else:
        @app.get("/")
        async def no_page() -> Response:
            return json_response({"message": "the web page is not installed; the API is at /v1/chat/completions"})

    return app


__all__ = ["ChatService", "WEB_DIR", "create_app"]
