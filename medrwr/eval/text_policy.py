"""Any OpenAI-compatible chat model as a policy (``--model openai:NAME --base-url URL``), at the text level.

:class:`ChatPolicyEngine` runs the same reason-query-retrieve loop as :class:`~medrwr.rollout.engine.RolloutEngine`
and returns the same :class:`~medrwr.rollout.trace.RolloutTrace` (so scoring and reports do not care), but over
the chat-completions API, on text:

* every turn is one ``POST {base_url}/chat/completions`` with ``stop=["</query>", "</answer>"]``; the servers
  strip the stop string, so the closing tag of the block left open is put back;
* a query's documents (``protocol.format_retrieval``, one batched ``Retriever.search`` per turn for all paused
  rows, as the engine does) continue the transcript either as a **user turn** holding the retrieve block
  (``eval.continuation: turns``; any chat API) or as a **continuation of the assistant message**
  (``prefill``: the assistant text so far is sent back with vLLM's ``continue_final_message``);
* the same round rules as the engine: ``max_rounds`` searches, then one "search budget spent" block, then the row
  ends with ``stop_reason="max_rounds"``.

It is **not token-exact**: the server re-tokenises the text each turn, there are no per-token log-probs, ids or
masks (the trace's token arrays are empty), so ``confidence`` is None and CDIR cannot run. Retrieved documents are
cut to ``4 × rollout.max_inserted_tokens`` characters per block (no tokenizer here).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from medrwr import protocol
from medrwr._imports import require
from medrwr.config import RolloutConfig
from medrwr.errors import BackendError
from medrwr.retrieval.base import Retriever
from medrwr.rollout.request import RolloutRequest, load_image
from medrwr.rollout.retrieval_step import search_batch
from medrwr.rollout.trace import RetrievalRecord, RolloutTrace

logger = logging.getLogger(__name__)

__all__ = ["OPENAI_PREFIX", "ChatPolicyEngine", "is_openai_model"]

OPENAI_PREFIX = "openai:"
_STOPS = [protocol.QUERY_STOP, protocol.ANSWER_STOP]


def is_openai_model(name: str | None) -> bool:
    """True for ``openai:MODEL`` policy names."""
    return bool(name) and str(name).startswith(OPENAI_PREFIX)


def _data_url(image: Any, max_pixels: int) -> str:
    if isinstance(image, (str, Path)) and Path(image).suffix.lower() in (".png", ".jpg", ".jpeg"):
        path = Path(image)
        mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
        return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()
    img = load_image(image, max_pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _close_open_block(text: str) -> str:
    """Put back the stop string the server stripped: the closing tag of the block left open."""
    for kind in (protocol.QUERY, protocol.ANSWER):
        if text.rfind(protocol.open_tag(kind)) > text.rfind(protocol.close_tag(kind)):
            return text + protocol.close_tag(kind)
    return text


@dataclass
class _Row:
    index: int
    request_id: str
    letters: str
    messages: list[dict[str, Any]]
    trace: RolloutTrace
    parts: list[tuple[str, str]] = field(default_factory=list)
    """("model" | "env", text) in order: what the transcript holds."""
    budget_notices: int = 0
    model_tokens: int = 0
    done: bool = False

    def text(self) -> str:
        return "".join(t for _, t in self.parts)

    def finish(self, reason: str, error: str | None = None) -> None:
        self.done = True
        self.trace.stop_reason = reason  # type: ignore[assignment]
        self.trace.error = error


class ChatPolicyEngine:
    """The rollout loop over an OpenAI-compatible chat endpoint; ``run(requests) -> list[RolloutTrace]``."""

    def __init__(
        self,
        model: str,
        base_url: str,
        retriever: Retriever | None = None,
        config: RolloutConfig | None = None,
        *,
        k: int = 3,
        search_mode: str | None = None,
        api_key: str | None = None,
        continuation: str = "turns",
        concurrency: int = 8,
        timeout_s: float = 120.0,
        client: Any = None,
    ):
        httpx = require("httpx", "eval", "openai: chat policies")
        self._httpx = httpx
        if continuation not in ("turns", "prefill"):
            raise ValueError(f"continuation must be turns or prefill, got {continuation!r}")
        self.model = model[len(OPENAI_PREFIX):] if is_openai_model(model) else model
        self.base_url = base_url.rstrip("/")
        self.retriever = retriever
        self.config = config or RolloutConfig()
        self.k = k
        self.search_mode = search_mode
        self.continuation = continuation
        self.concurrency = concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(timeout=timeout_s, headers=headers)
        self.requests_sent = 0

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ one chat call

    def _post(self, body: dict[str, Any]) -> tuple[str, str, int]:
        httpx = self._httpx
        url = f"{self.base_url}/chat/completions"
        last: Exception | None = None
        for attempt in range(3):
            try:
                r = self.client.post(url, json=body)
            except httpx.HTTPError as exc:
                last = exc
                time.sleep(0.2 * (attempt + 1))
                continue
            if r.status_code >= 500:
                last = BackendError(f"{url} answered {r.status_code}: {r.text[:200]}")
                time.sleep(0.2 * (attempt + 1))
                continue
            if r.status_code >= 400:
                raise BackendError(f"{url} answered {r.status_code}: {r.text[:300]}")
            self.requests_sent += 1
            data = r.json()
            try:
                choice = data["choices"][0]
                text = choice["message"].get("content") or ""
                finish = choice.get("finish_reason") or "stop"
            except (KeyError, IndexError, TypeError, AttributeError):
                raise BackendError(f"{url} answered something that is not a chat completion: {str(data)[:200]}") from None
            used = int((data.get("usage") or {}).get("completion_tokens") or max(1, len(text) // 4))
            return text, finish, used
        raise BackendError(f"cannot reach the policy endpoint {url}: {last}")

    def _body(self, row: _Row, budget: int) -> dict[str, Any]:
        cfg = self.config
        messages = list(row.messages)
        extra: dict[str, Any] = {}
        if self.continuation == "turns":
            for who, text in row.parts:
                role = "assistant" if who == "model" else "user"
                if messages[-1]["role"] == role and isinstance(messages[-1]["content"], str):
                    messages[-1] = {"role": role, "content": messages[-1]["content"] + text}
                else:
                    messages.append({"role": role, "content": text})
            if messages[-1]["role"] == "assistant":  # nothing to answer yet (first turn has no parts)
                messages.append({"role": "user", "content": "Continue."})
        elif row.parts:
            messages.append({"role": "assistant", "content": row.text()})
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        body: dict[str, Any] = {
            "model": self.model, "messages": messages, "stop": _STOPS, "max_tokens": budget,
            "temperature": cfg.temperature, "top_p": cfg.top_p, **extra,
        }
        if cfg.seed is not None:
            body["seed"] = cfg.seed
        return body

    # ------------------------------------------------------------------ the loop

    def _prepare(self, req: RolloutRequest, index: int) -> _Row:
        if req.messages is not None:
            raise BackendError("openai: policies take questions, not ready-made chat messages")
        images = list(req.images)
        system = req.system if req.system is not None else protocol.system_prompt(with_image=bool(images))
        text = protocol.format_question(req.question, req.options)
        content: Any = text
        if images:
            content = [{"type": "image_url", "image_url": {"url": _data_url(img, self.config.max_image_pixels)}}
                       for img in images] + [{"type": "text", "text": text}]
        rid = req.request_id if req.request_id is not None else str(index)
        trace = RolloutTrace(prompt_ids=[], images=[str(i) if isinstance(i, (str, Path)) else "<in-memory image>"
                                                    for i in images], metadata=dict(req.metadata))
        trace.metadata.update(request_id=rid, policy=f"{OPENAI_PREFIX}{self.model}", text_level=True,
                              continuation=self.continuation)
        return _Row(index, rid, req.option_letters(), [{"role": "system", "content": system},
                                                       {"role": "user", "content": content}], trace)

    def run(self, requests: Sequence[RolloutRequest]) -> list[RolloutTrace]:
        rows = [self._prepare(r, i) for i, r in enumerate(requests)]
        cfg = self.config
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for _ in range(4 * (cfg.max_rounds + 2) + 8):
                active = [r for r in rows if not r.done]
                for r in active:
                    if cfg.max_total_new_tokens - r.model_tokens <= 0:
                        r.finish("max_tokens", "total token budget spent")
                active = [r for r in active if not r.done]
                if not active:
                    break
                budgets = [min(cfg.max_new_tokens_per_turn, cfg.max_total_new_tokens - r.model_tokens) for r in active]
                outs = list(pool.map(lambda rb: self._post(self._body(*rb)), zip(active, budgets)))
                pending = []
                for row, (text, finish, used) in zip(active, outs):
                    queries = self._absorb(row, text, finish, used)
                    if queries:
                        pending.append((row, queries))
                if pending:
                    self._retrieve(pending)
        for r in rows:
            if not r.done:
                r.finish("no_progress", "turn limit reached")
            self._finalize(r)
        return [r.trace for r in rows]

    def _absorb(self, row: _Row, text: str, finish: str, used: int) -> list[str]:
        row.model_tokens += used
        if not text:
            row.finish("no_progress", "the model generated no text")
            return []
        text = _close_open_block(text) if finish == "stop" else text
        row.parts.append(("model", text))
        segs = protocol.split_segments(text)
        answers = [s for s in segs if s.kind == protocol.ANSWER and s.closed]
        if answers:
            row.trace.answer = answers[-1].content.strip()
            row.finish("answer")
            return []
        queries = [" ".join(s.content.split()) for s in segs if s.kind == protocol.QUERY and s.closed]
        if queries and text.rstrip().endswith(protocol.QUERY_STOP):
            if not all(queries):
                row.finish("error", "empty_query: the model wrote an empty <query> block")
                return []
            qpt = self.config.queries_per_turn
            return queries[:qpt] if qpt else queries
        if finish == "length":
            row.finish("max_tokens", "max_new_tokens_per_turn reached before </query> or </answer>")
        else:
            row.finish("eos", "the model ended without an answer block")
        return []

    def _retrieve(self, pending: list[tuple[_Row, list[str]]]) -> None:
        to_search = []
        for row, queries in pending:
            row.trace.queries.extend(queries)
            if row.trace.rounds >= self.config.max_rounds:
                if row.budget_notices >= 1:
                    row.finish("max_rounds", f"query after the search budget ({self.config.max_rounds}) was spent")
                    continue
                row.budget_notices += 1
                row.parts.append(("env", "\n" + protocol.format_budget_notice(self.config.max_rounds)))
                continue
            to_search.append((row, queries))
        if not to_search:
            return
        flat = [q for _, qs in to_search for q in qs]
        results, error, seconds = search_batch(self.retriever, flat, self.k, self.search_mode,
                                               self.config.retrieval_timeout_s, time.perf_counter)
        cap = 4 * self.config.max_inserted_tokens
        i = 0
        for row, queries in to_search:
            row.trace.rounds += 1
            hits = results[i: i + len(queries)] if results is not None else [[] for _ in queries]
            i += len(queries)
            row.trace.retrievals.append(RetrievalRecord(round=row.trace.rounds, queries=list(queries),
                                                        hits=[list(h) for h in hits], error=error, seconds=seconds))
            for query_hits in hits:
                if error is not None:
                    block = protocol.format_retrieval_failure(error)
                else:
                    block = protocol.format_retrieval([h.text for h in query_hits])
                    if len(block) > cap:
                        block = block[: cap - len("…\n</retrieve>\n")] + "…\n</retrieve>\n"
                row.parts.append(("env", "\n" + block))

    def _finalize(self, row: _Row) -> None:
        tr = row.trace
        tr.completion_text = row.text()
        parsed = protocol.parse_completion(tr.completion_text)
        tr.valid = parsed.valid
        if not parsed.valid:
            tr.metadata["invalid"] = parsed.error
        tr.choice = protocol.extract_choice(tr.answer, row.letters or protocol.OPTION_LETTERS)
        tr.metadata["model_tokens"] = row.model_tokens


def api_key_from_env(var: str) -> str | None:
    """The API key in environment variable ``var`` (never written to run.json)."""
    return os.environ.get(var) or None
