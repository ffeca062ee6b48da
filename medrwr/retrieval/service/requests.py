"""Reading and checking requests: the service's one validation layer.

Bodies are read with a size limit, parsed as JSON into the pydantic models of
:mod:`~medrwr.retrieval.service.schemas` (shape and types), then checked against the server's
limits here (counts, lengths, ``k``) with the rules every retriever and the CLI share
(:mod:`medrwr.retrieval.limits`; the ``server.max_*`` settings default to its numbers). A broken
rule is a 400 (413 for a big body) that names the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from medrwr.config import ServerConfig
from medrwr.errors import InputError
from medrwr.retrieval import limits
from medrwr.retrieval.service.errors import APIError, bad
from medrwr.retrieval.service.schemas import ImageSearchRequest, validation_message

_DRAIN_LIMIT = 16 * 1024 * 1024
"""An oversized body up to this size is read and discarded before the 413 is sent, so the client
sees the answer instead of a connection reset; beyond it the connection is closed."""


def _as_400(exc: InputError) -> APIError:
    return bad(str(exc), exc.code, exc.param)


def check_queries(queries: list[str], cfg: ServerConfig) -> None:
    """The shared query rules (:func:`medrwr.retrieval.limits.check_queries`) with this server's limits."""
    try:
        limits.check_queries(
            queries,
            max_queries=cfg.max_queries_per_request,
            max_chars=cfg.max_query_chars,
            settings=("server.max_queries_per_request", "server.max_query_chars"),
        )
    except InputError as exc:
        raise _as_400(exc) from None


def check_k(k: int, cfg: ServerConfig) -> None:
    """The shared ``k`` rule (:func:`medrwr.retrieval.limits.check_k`) with ``server.max_k``."""
    try:
        limits.check_k(k, max_k=cfg.max_k, setting="server.max_k")
    except InputError as exc:
        raise _as_400(exc) from None


def check_images(n: int, cfg: ServerConfig) -> None:
    if not n:
        raise bad("'images' is empty: send at least one image", "empty_images", "images")
    if n > cfg.max_images_per_request:
        raise bad(
            f"too many images in one request: {n} > {cfg.max_images_per_request} "
            "(server.max_images_per_request)",
            "too_many_images",
            "images",
        )


def decode_images(images: list[bytes]) -> list[Any]:
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
            raise bad(f"images[{i}] could not be decoded as an image ({kind})", "invalid_image", f"images[{i}]") from None
        out.append(img)
    return out


def _b64_image(s: str, i: int) -> bytes:
    if s.startswith("data:"):
        _, _, s = s.partition(",")
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad(f"images[{i}] is not valid base64 ({exc})", "invalid_base64", f"images[{i}]") from None


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
            raise bad(f"invalid Content-Length header {declared!r}", "invalid_content_length") from None
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
            raise bad("the client disconnected while sending the body", "client_disconnected") from None
    if over:
        raise APIError(
            413,
            f"request body is {max(size, n_declared or 0)} bytes; the limit is {limit} bytes "
            "(server.max_body_bytes): send fewer or shorter queries",
            code="body_too_large",
        )
    return b"".join(chunks)


async def read_json(request: Any, limit: int) -> dict[str, Any]:
    body = await _read_body(request, limit)
    if not body.strip():
        raise bad("the request body is empty; send a JSON object", "empty_body")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}", "invalid_json") from None
    except RecursionError:
        raise bad("the request body is not valid JSON: nested too deeply", "invalid_json") from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, got {type(data).__name__}", "invalid_body")
    return data


def parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise bad(message, "invalid_parameter", param) from None


async def image_request(request: Any, config: ServerConfig) -> tuple[list[bytes], int]:
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
            raise bad(f"could not parse the multipart form: {detail}", "invalid_multipart") from None
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
            raise bad(f"form field 'k' must be an integer, got {k_raw!r}", "invalid_parameter", "k") from None
        if not images:
            raise bad("the multipart form has no files; attach images as file fields named 'images'", "empty_images")
        return images, k
    req = parse(ImageSearchRequest, await read_json(request, config.max_body_bytes))
    if len(req.images) > config.max_images_per_request:  # refused before decoding any base64
        check_images(len(req.images), config)
    return [_b64_image(s, i) for i, s in enumerate(req.images)], req.k


__all__ = ["check_images", "check_k", "check_queries", "decode_images", "image_request", "parse", "read_json"]
