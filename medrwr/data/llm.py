"""A small client for any OpenAI-compatible chat endpoint, for data synthesis: JSON-schema replies, a disk
cache, bounded retries, token counts.

Every successful reply is cached in one JSON file per key = sha256(model, messages, schema, temperature,
max_tokens), written atomically, so a rerun (or a resumed stage) costs no calls. Transport failures are
retried ``retries`` times with exponential back-off: timeouts, connection errors, HTTP 429 (its
``Retry-After`` wins, capped at 60 s) and 5xx. Other 4xx answers are not retried. A request that still fails
returns a :class:`ChatResult` with ``error`` set; nothing here raises on what the server says. (Same pattern as
``medrwr.eval.judge_llm``, which is specific to judging.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrwr._imports import require
from medrwr._io import write_json_atomic
from medrwr.errors import SynthesisError

log = logging.getLogger(__name__)

__all__ = ["ChatClient", "ChatResult", "ChatUsage"]


@dataclass
class ChatUsage:
    """Token and request counters, shared by every thread of a stage."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    rate_limited: int = 0
    timeouts: int = 0
    server_errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass
class ChatResult:
    """One reply: ``content`` (None when the request failed; then ``error`` says why), its token usage and
    whether it came from the cache."""

    content: str | None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


class ChatClient:
    """POST ``{url}/chat/completions`` (``url`` like ``http://127.0.0.1:8000/v1``); thread-safe."""

    def __init__(self, url: str, model: str, cache_dir: str | os.PathLike, *, api_key: str | None = None,
                 timeout_s: float = 60.0, retries: int = 4, backoff_s: float = 1.0, temperature: float = 0.7,
                 max_tokens: int = 1024):
        if not str(url).startswith(("http://", "https://")):
            raise SynthesisError(f"--llm-url must be the http(s) base URL of an OpenAI-compatible server "
                                 f"(e.g. http://127.0.0.1:8000/v1), got {url!r}")
        if not str(model).strip():
            raise SynthesisError("--llm-model is empty: name the model the server serves")
        url = str(url).rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else f"{url}/chat/completions"
        self.model = str(model)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.retries, self.backoff_s = max(0, int(retries)), float(backoff_s)
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.usage = ChatUsage()
        httpx = require("httpx", "serve", "calling an OpenAI-compatible LLM")
        key = api_key or os.environ.get("MEDRWR_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self._client = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {key}"} if key else {})
        self._httpx = httpx

    # --- cache ----------------------------------------------------------------------------------------------

    def key(self, messages: list[dict[str, Any]], schema: dict[str, Any] | None) -> str:
        blob = json.dumps([self.model, messages, schema, self.temperature, self.max_tokens], sort_keys=True,
                          ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _store(self, key: str, entry: dict[str, Any]) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(p, entry)

    # --- calls ----------------------------------------------------------------------------------------------

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff_s * 2**attempt
        if retry_after:
            try:
                delay = float(retry_after)
            except ValueError:
                pass
        time.sleep(min(60.0, max(0.0, delay)))

    def chat(self, messages: list[dict[str, Any]], schema: dict[str, Any] | None = None,
             schema_name: str = "reply") -> ChatResult:
        """The reply to ``messages`` (from the cache when this exact request was answered before)."""
        key = self.key(messages, schema)
        try:
            hit = json.loads(self._path(key).read_text(encoding="utf-8"))
            self.usage.add(cache_hits=1)
            return ChatResult(hit["content"], None, hit.get("prompt_tokens", 0), hit.get("completion_tokens", 0),
                              cached=True)
        except (OSError, ValueError, KeyError):
            pass
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature,
                                "max_tokens": self.max_tokens}
        if schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": schema_name, "schema": schema, "strict": True}}
        reason = "no attempt"
        for attempt in range(self.retries + 1):
            retry_after = None
            self.usage.add(requests=1, retries=int(attempt > 0))
            try:
                r = self._client.post(self.endpoint, json=body)
                if r.status_code == 429 or r.status_code >= 500:
                    self.usage.add(**({"rate_limited": 1} if r.status_code == 429 else {"server_errors": 1}))
                    reason, retry_after = f"HTTP {r.status_code}", r.headers.get("retry-after")
                elif r.status_code >= 400:
                    return ChatResult(None, f"HTTP {r.status_code}: {r.text[:200]}")
                else:
                    data = r.json()
                    content = data["choices"][0]["message"]["content"]
                    if not isinstance(content, str):
                        raise TypeError("message content is not a string")
                    usage = data.get("usage") or {}
                    pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
                    self.usage.add(prompt_tokens=pt, completion_tokens=ct)
                    self._store(key, {"model": self.model, "messages": messages, "content": content,
                                      "prompt_tokens": pt, "completion_tokens": ct})
                    return ChatResult(content, None, pt, ct)
            except self._httpx.TimeoutException as exc:
                self.usage.add(timeouts=1)
                reason = f"timeout: {exc}"
            except (self._httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if attempt < self.retries:
                self._wait(attempt, retry_after)
        log.warning("LLM %s failed after %d attempt(s): %s", self.model, self.retries + 1, reason)
        return ChatResult(None, reason)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
