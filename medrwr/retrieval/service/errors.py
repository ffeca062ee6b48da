"""Every failure of the retrieval service as one OpenAI-shaped body: ``{"error": {message, type, code, param}}``.

:class:`APIError` is raised anywhere in a request and answered by the handlers that
:func:`install_error_handlers` registers; unknown routes, methods and unexpected exceptions get the
same shape.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from medrwr.retrieval.service.schemas import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

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
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        info = ErrorInfo(message=self.message, type=kind, code=self.code, param=self.param)
        return ErrorResponse(error=info).model_dump()


def bad(message: str, code: str, param: str | None = None) -> APIError:
    """A 400 answer: the client sent something we cannot use."""
    return APIError(400, message, code=code, param=param)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure on ``app`` with the error body (404/405 name the routes; 500 hides internals)."""

    async def on_api_error(request: Request, exc: APIError) -> Response:
        return json_response(exc.body(), exc.status, exc.headers)

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.url.path}; routes: /v1/search, /v1/search/image, /queries, /healthz, /metrics"
        err = APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {}))
        return json_response(err.body(), err.status, err.headers)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        err = bad("; ".join(str(e.get("msg")) for e in exc.errors()[:3]) or "invalid request", "invalid_parameter")
        return json_response(err.body(), 400)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        err = APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")
        return json_response(err.body(), 500)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)


__all__ = ["APIError", "bad", "install_error_handlers", "json_response"]
