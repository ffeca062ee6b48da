"""HTTP clients for the retrieval service, implementing :class:`Retriever` / :class:`ImageRetriever`.

:class:`RetrievalClient` (sync, ``httpx.Client``) and :class:`AsyncRetrievalClient` (``httpx.AsyncClient``)
share everything but the transport call: request building, response parsing and the retry policy are
written once, as a generator that yields "send this" / "sleep this long" steps and receives the
outcomes (so the sync/async duplication of httpx's ``_client.py`` is avoided).

Retries: connection errors, 429, 502, 503 and 504 are retried with exponential backoff, honouring
the server's ``Retry-After``. Search is idempotent, so retrying a request the server may have seen
is safe. A read timeout is not retried (the server is slow, more load will not help).

Exceptions (each carries ``.queries``, the batch that failed)::

    RetrievalError
     ├── RetrievalUnavailable    cannot connect, or the server stayed busy through every retry
     ├── RetrievalTimeout        no answer within the timeout
     ├── BadRetrievalResponse    an answer we cannot use (not JSON, wrong shape, a 5xx)
     └── RetrievalRequestError   the server refused the request (4xx: bad input, wrong API key);
                                 ``.status`` and ``.code`` come from the server's error body

Long module: both clients and the core they share (requests, parsing, the retry policy) stay
together, so the policy is written once and read next to its two drivers.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import logging
import os
import random
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from medrwr.errors import (
    BadRetrievalResponse,
    RetrievalError,
    RetrievalRequestError,
    RetrievalTimeout,
    RetrievalUnavailable,
)
from medrwr.retrieval.base import (
    SEARCH_MODES,
    Hit,
    ImageHit,
    ImageRetriever,
    Retriever,
    SearchMode,
    check_search_args,
)

logger = logging.getLogger(__name__)

RETRY_STATUSES = (429, 502, 503, 504)


@dataclass(frozen=True)
class _Send:
    path: str
    body: bytes


@dataclass(frozen=True)
class _Sleep:
    seconds: float


_Step = Generator["_Send | _Sleep", Any, Any]


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delay-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(response: Any) -> tuple[str, str | None]:
    """The server's error message and code, from our error body or whatever text came back."""
    try:
        data = response.json()
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"]), err.get("code")
        if isinstance(data, dict) and data.get("detail"):
            return str(data["detail"]), None
    except ValueError:
        pass
    text = (response.text or "").strip()
    return (text[:300] or response.reason_phrase or "no body"), None


def _encode_image(image: Any, i: int) -> str:
    """Base64 of an image given as bytes, a path, or a PIL image (saved as PNG)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ValueError(f"images[{i}]: cannot read image file {image!r}: {exc.strerror}") from None
    elif hasattr(image, "save") and hasattr(image, "mode"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise TypeError(f"images[{i}] must be bytes, a path or a PIL image, got {type(image).__name__}")
    return base64.b64encode(data).decode("ascii")


def _image_label(image: Any, i: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"<image {i}: {type(image).__name__}>"


class _ClientCore:
    """Everything the two clients share: settings, request building, parsing, the retry loop."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
        connect_timeout: float = 5.0,
        mode: SearchMode | None = None,
        max_batch: int = 256,
    ):
        if not url or "://" not in url:
            raise ValueError(f"url must look like http://127.0.0.1:8321, got {url!r}")
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("retries, backoff and max_backoff must be >= 0")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = float(timeout)
        self.connect_timeout = float(min(connect_timeout, timeout))
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.mode = mode
        self.max_batch = int(max_batch)

    # ---------------------------------------------------------------- httpx settings

    def _httpx_kwargs(self) -> dict[str, Any]:
        import httpx

        headers = {"content-type": "application/json", "accept": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return {
            "base_url": self.url,
            "headers": headers,
            "timeout": httpx.Timeout(self.timeout, connect=self.connect_timeout),
            "limits": httpx.Limits(max_connections=256, max_keepalive_connections=64),
        }

    # ---------------------------------------------------------------- requests and answers

    def _search_body(self, queries: Sequence[str], k: int, mode: SearchMode | None) -> bytes:
        payload: dict[str, Any] = {"queries": list(queries), "k": int(k)}
        mode = mode or self.mode
        if mode is not None:
            payload["mode"] = mode
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")

    def _image_body(self, images: Sequence[Any], k: int) -> bytes:
        payload = {"images": [_encode_image(img, i) for i, img in enumerate(images)], "k": int(k)}
        return json.dumps(payload).encode("ascii")

    def _results(self, response: Any, n: int, queries: Sequence[str]) -> list[Any]:
        try:
            data = response.json()
        except ValueError:
            raise BadRetrievalResponse(
                f"retrieval server at {self.url} answered with something that is not JSON: {response.text[:200]!r}",
                queries,
            ) from None
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list) or len(results) != n or not all(isinstance(r, list) for r in results):
            got = f"{len(results)} lists" if isinstance(results, list) else type(results).__name__
            raise BadRetrievalResponse(
                f"retrieval server at {self.url} answered {got} for {n} queries (expected 'results': one list "
                "per query); is the URL a MedRwR retrieval server?",
                queries,
            )
        return results

    def _parse_hits(self, response: Any, queries: Sequence[str]) -> list[list[Hit]]:
        results = self._results(response, len(queries), queries)
        try:
            return [[Hit.from_dict(h) for h in hits] for hits in results]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadRetrievalResponse(f"retrieval server at {self.url} sent a malformed hit: {exc!r}", queries) from None

    def _parse_image_hits(self, response: Any, labels: Sequence[str]) -> list[list[ImageHit]]:
        results = self._results(response, len(labels), labels)
        try:
            return [[ImageHit.from_dict(h) for h in hits] for hits in results]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadRetrievalResponse(
                f"retrieval server at {self.url} sent a malformed image hit: {exc!r}", labels
            ) from None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.max_backoff, self.backoff * (2**attempt)) * (0.5 + random.random() / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, max(self.max_backoff, 0.0)))
        return delay

    def _exchange(
        self, path: str, body: bytes, queries: Sequence[str], parse: Callable[[Any, Sequence[str]], Any]
    ) -> _Step:
        """The retry policy, transport-free: yields steps, receives responses or transport errors."""
        import httpx

        last = ""
        unreachable = False
        for attempt in range(self.retries + 1):
            outcome = yield _Send(path, body)
            retry_after = None
            if isinstance(outcome, BaseException):
                if isinstance(outcome, httpx.TimeoutException) and not isinstance(
                    outcome, (httpx.ConnectTimeout, httpx.PoolTimeout)
                ):
                    raise RetrievalTimeout(
                        f"retrieval server at {self.url} did not answer {path} within {self.timeout} s "
                        f"({type(outcome).__name__}); raise the client timeout or check the server's load",
                        queries,
                    ) from outcome
                if not isinstance(outcome, httpx.TransportError):
                    raise outcome
                unreachable = True
                last = f"{type(outcome).__name__}: {outcome}"
            elif outcome.status_code == 200:
                return parse(outcome, queries)
            elif outcome.status_code in RETRY_STATUSES:
                unreachable = False
                message, _ = _error_message(outcome)
                last = f"HTTP {outcome.status_code}: {message}"
                retry_after = _retry_after(outcome.headers.get("retry-after"))
            else:
                raise self._status_error(outcome, path, queries)
            if attempt < self.retries:
                delay = self._delay(attempt, retry_after)
                logger.info("retrieval %s failed (%s); retry %d/%d in %.2fs", path, last, attempt + 1, self.retries, delay)
                yield _Sleep(delay)
        attempts = self.retries + 1
        if unreachable:
            raise RetrievalUnavailable(
                f"cannot reach retrieval server at {self.url}: start it with "
                f"`medrwr serve retrieval --index DIR` (after {attempts} attempts; last error: {last})",
                queries,
            )
        raise RetrievalUnavailable(
            f"retrieval server at {self.url} stayed busy through {attempts} attempts (last: {last}); "
            "lower the request rate or raise server.max_queue",
            queries,
        )

    def _status_error(self, response: Any, path: str, queries: Sequence[str]) -> RetrievalError:
        message, code = _error_message(response)
        status = response.status_code
        if status == 401:
            hint = "pass api_key=... (the server's --api-key-env token)" if not self.api_key else "check the api_key"
            return RetrievalRequestError(
                f"retrieval server at {self.url} refused the API key ({message}): {hint}", queries, status, code
            )
        if status == 404:
            return RetrievalRequestError(
                f"retrieval server at {self.url} has no route {path} (HTTP 404): is this a MedRwR retrieval server?",
                queries,
                status,
                code,
            )
        if 400 <= status < 500:
            return RetrievalRequestError(
                f"retrieval server at {self.url} rejected the request (HTTP {status}): {message}", queries, status, code
            )
        return BadRetrievalResponse(f"retrieval server at {self.url} failed (HTTP {status}): {message}", queries)

    def _search_steps(self, queries: list[str], k: int, mode: SearchMode | None) -> list[_Step]:
        if mode is not None and mode not in SEARCH_MODES:  # the server checks the index's own modes
            raise ValueError(f"unknown retrieval mode {mode!r}; choose one of {', '.join(SEARCH_MODES)}")
        out = []
        for start in range(0, len(queries), self.max_batch):
            chunk = queries[start : start + self.max_batch]
            out.append(self._exchange("/v1/search", self._search_body(chunk, k, mode), chunk, self._parse_hits))
        return out

    def _image_steps(self, images: Sequence[Any], k: int) -> list[_Step]:
        images = list(images)
        out = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            labels = [_image_label(img, start + i) for i, img in enumerate(chunk)]
            out.append(self._exchange("/v1/search/image", self._image_body(chunk, k), labels, self._parse_image_hits))
        return out


def _with_batch(exc: RetrievalError, queries: Sequence[Any]) -> RetrievalError:
    """Errors carry the caller's whole batch, not just the chunk that failed."""
    exc.queries = [q if isinstance(q, str) else _image_label(q, i) for i, q in enumerate(queries)]
    return exc


def _describe(url: str, health: dict[str, Any], mode: str | None) -> dict[str, Any]:
    modes = list(health.get("modes") or [])
    return {
        "kind": "http",
        "url": url,
        "doc_count": int(health.get("documents") or 0),
        "modes": modes,
        "default_mode": mode or health.get("default_mode"),
        "encoder": health.get("encoder"),
        "server": {"retriever": health.get("retriever"), "index": health.get("index")},
    }


class RetrievalClient(_ClientCore, Retriever):
    """Sync client: ``RetrievalClient("http://127.0.0.1:8321").search(["chest pain"], k=3)``.

    One pooled ``httpx.Client`` (keep-alive connections are reused); close it with :meth:`close`
    or use the client as a context manager. Batches bigger than ``max_batch`` are sent in chunks.
    ``modes``, ``default_mode`` and ``doc_count`` come from the server's ``/healthz`` (asked once,
    on first use; :meth:`warmup` asks now). :meth:`image_retriever` is its image search as an
    :class:`~medrwr.retrieval.base.ImageRetriever`.
    """

    def __init__(self, url: str, api_key: str | None = None, *, transport: Any = None, **kwargs: Any):
        super().__init__(url, api_key, **kwargs)
        import httpx

        self._http = httpx.Client(transport=transport, **self._httpx_kwargs())
        self._health: dict[str, Any] | None = None

    def _server(self) -> dict[str, Any]:
        if self._health is None:
            self._health = self.health()
        return self._health

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self._server().get("modes") or ())

    @property
    def default_mode(self) -> str:
        return str(self.mode or self._server().get("default_mode"))

    @property
    def doc_count(self) -> int:
        return int(self._server().get("documents") or 0)

    def describe(self) -> dict[str, Any]:
        return _describe(self.url, self._server(), self.mode)

    def warmup(self) -> None:
        """Check now that the server answers (raises RetrievalUnavailable naming the URL if not)."""
        self._health = self.health()

    def image_retriever(self) -> RemoteImageRetriever:
        """The server's ``/v1/search/image`` as an ImageRetriever (sharing this client's connections)."""
        return RemoteImageRetriever(self)

    def _drive(self, steps: _Step) -> Any:
        import httpx

        step = next(steps)
        while True:
            if isinstance(step, _Sleep):
                time.sleep(step.seconds)
                outcome: Any = None
            else:
                try:
                    outcome = self._http.post(step.path, content=step.body)
                except httpx.HTTPError as exc:
                    outcome = exc
            try:
                step = steps.send(outcome)
            except StopIteration as stop:
                return stop.value

    def search(self, queries: Sequence[str], k: int = 3, mode: SearchMode | None = None) -> list[list[Hit]]:
        queries = check_search_args(queries, k)
        if not queries:
            return []
        out: list[list[Hit]] = []
        try:
            for steps in self._search_steps(queries, k, mode):
                out.extend(self._drive(steps))
        except RetrievalError as exc:
            raise _with_batch(exc, queries)
        return out

    def search_images(self, images: Sequence[Any], k: int = 1) -> list[list[ImageHit]]:
        if not images:
            return []
        out: list[list[ImageHit]] = []
        try:
            for steps in self._image_steps(images, k):
                out.extend(self._drive(steps))
        except RetrievalError as exc:
            raise _with_batch(exc, images)
        return out

    def health(self) -> dict[str, Any]:
        """The server's /healthz answer; raises RetrievalUnavailable when it cannot be reached."""
        import httpx

        try:
            response = self._http.get("/healthz")
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise RetrievalUnavailable(
                f"cannot reach retrieval server at {self.url}: start it with `medrwr serve retrieval --index DIR` ({exc})"
            ) from exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RetrievalClient:
        return self


class RemoteImageRetriever(ImageRetriever):
    """A retrieval server's image index, through a :class:`RetrievalClient`."""

    def __init__(self, client: RetrievalClient):
        self.client = client

    @property
    def doc_count(self) -> int:
        return int(self.client._server().get("images") or 0)

    def describe(self) -> dict[str, Any]:
        return {"kind": "http-image", "url": self.client.url, "doc_count": self.doc_count, "encoder": None}

    def search_images(self, images: Sequence[Any], k: int = 1) -> list[list[ImageHit]]:
        return self.client.search_images(images, k=k)

    def close(self) -> None:
        self.client.close()


class AsyncRetrievalClient(_ClientCore):
    """Async client with the same API: ``await client.search(queries, k)``.

    Chunks of a big batch are sent concurrently; the server merges them into its batches anyway.
    """

    def __init__(self, url: str, api_key: str | None = None, *, transport: Any = None, **kwargs: Any):
        super().__init__(url, api_key, **kwargs)
        import httpx

        self._http = httpx.AsyncClient(transport=transport, **self._httpx_kwargs())

    async def _drive(self, steps: _Step) -> Any:
        import httpx

        step = next(steps)
        while True:
            if isinstance(step, _Sleep):
                await asyncio.sleep(step.seconds)
                outcome: Any = None
            else:
                try:
                    outcome = await self._http.post(step.path, content=step.body)
                except httpx.HTTPError as exc:
                    outcome = exc
            try:
                step = steps.send(outcome)
            except StopIteration as stop:
                return stop.value

    async def search(self, queries: Sequence[str], k: int = 3, mode: SearchMode | None = None) -> list[list[Hit]]:
        queries = check_search_args(queries, k)
        if not queries:
            return []
        try:
            parts = await asyncio.gather(*(self._drive(steps) for steps in self._search_steps(queries, k, mode)))
        except RetrievalError as exc:
            raise _with_batch(exc, queries)
        return [hits for part in parts for hits in part]

    async def search_images(self, images: Sequence[Any], k: int = 1) -> list[list[ImageHit]]:
        if not images:
            return []
        try:
            parts = await asyncio.gather(*(self._drive(steps) for steps in self._image_steps(images, k)))
        except RetrievalError as exc:
            raise _with_batch(exc, images)
        return [hits for part in parts for hits in part]

    async def health(self) -> dict[str, Any]:
        import httpx

        try:
            response = await self._http.get("/healthz")
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise RetrievalUnavailable(
                f"cannot reach retrieval server at {self.url}: start it with `medrwr serve retrieval --index DIR` ({exc})"
            ) from exc

    async def describe(self) -> dict[str, Any]:
        """What :meth:`RetrievalClient.describe` says, asked now (the async client caches nothing)."""
        return _describe(self.url, await self.health(), self.mode)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRetrievalClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = ["AsyncRetrievalClient", "RemoteImageRetriever", "RetrievalClient"]
