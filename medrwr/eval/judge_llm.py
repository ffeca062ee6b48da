"""Optional LLM judge for open answers over any OpenAI-compatible chat endpoint (a local vLLM server, or
GPT-4.1 for parity with papers that used MedEvalKit's judge).

The prompt paraphrases MedEvalKit's (question, standard answer, user's answer; similar meaning or another
interpretation counts as correct; reply ``<think>…</think><judge>0|1</judge>``, 0 = correct). Verdicts are cached
on disk, one JSON file per (judge model, question, gold, response), written atomically, so a rerun or a second
preset costs no calls. A failed call is not cached and scores the item wrong with a note, as MedEvalKit counts it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from medrwr._imports import require
from medrwr._io import write_json_atomic
from medrwr.errors import ConfigError
from medrwr.eval.record import EvalRecord, Verdict

__all__ = ["JUDGE_PROMPT", "LLMJudge", "parse_judge_reply"]

log = logging.getLogger(__name__)

JUDGE_PROMPT = """Decide whether the user's answer to a medical question is correct, given the standard answer. \
An answer that means the same as the standard answer, or is another valid reading of it, is correct.

Question: {question}

Standard answer: {gold}

User's answer: {response}

Reply in exactly this format (0 means correct, 1 means incorrect):
<think>{{one or two sentences}}</think>
<judge>{{0 or 1}}</judge>

Example: standard answer "right", user's answer "right frontal lobe":
<think>Both name the right side, so the user's answer is correct.</think>
<judge>0</judge>"""


def parse_judge_reply(text: str | None) -> bool:
    """MedEvalKit's reading: the ``<judge>`` content (or the whole reply without tags) must be exactly ``0``.

    >>> parse_judge_reply("<think>same</think><judge>0</judge>"), parse_judge_reply("<judge>1</judge>")
    (True, False)
    >>> parse_judge_reply(" 0 "), parse_judge_reply(None)
    (True, False)
    """
    if not text:
        return False
    parts = []
    start = text.find("<judge>")
    while start != -1:
        end = text.find("</judge>", start + 7)
        if end == -1:
            break
        parts.append(text[start + 7 : end])
        start = text.find("<judge>", end + 8)
    inner = " ".join(parts).strip() if parts else text.strip()
    return inner == "0"


class LLMJudge:
    """Judge open answers with a chat model at ``url`` (an OpenAI-compatible base URL such as
    ``http://127.0.0.1:8000/v1``), caching verdicts under ``cache_dir``. ``id`` (the model name) is what a report
    records. Thread-safe; :meth:`verdicts` runs up to ``max_workers`` requests at once."""

    def __init__(self, url: str, model: str, cache_dir: str | Path, *, api_key: str | None = None,
                 timeout: float = 120.0, max_workers: int = 8, retries: int = 2, max_tokens: int = 1024):
        if not str(url).startswith(("http://", "https://")):
            raise ConfigError(f"--judge-url must be an http(s) URL of an OpenAI-compatible server, got {url!r}")
        if not str(model).strip():
            raise ConfigError("--judge-model is empty: name the judge model the server serves")
        url = str(url).rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else f"{url}/chat/completions"
        self.model = str(model)
        self.cache_dir = Path(cache_dir).expanduser()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_workers = max(1, int(max_workers))
        self.retries = max(0, int(retries))
        self.max_tokens = int(max_tokens)
        self.calls = 0
        httpx = require("httpx", "serve", "the LLM judge")
        key = api_key or os.environ.get("MEDRWR_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)
        self._httpx = httpx

    @property
    def id(self) -> str:
        return self.model

    # --- cache ------------------------------------------------------------------------------------------

    def _key(self, question: str, gold: str, response: str) -> str:
        blob = json.dumps([self.model, question, gold, response], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def cached(self, question: str, gold: str, response: str) -> bool | None:
        """The cached verdict, or None when this (model, question, gold, response) was never judged."""
        p = self._path(self._key(question, gold, response))
        try:
            return bool(json.loads(p.read_text(encoding="utf-8"))["correct"])
        except (OSError, ValueError, KeyError):
            return None

    def _store(self, key: str, entry: dict[str, Any]) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(p, entry)

    # --- calls ------------------------------------------------------------------------------------------

    def _ask(self, question: str, gold: str, response: str) -> str | None:
        body = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens, "messages": [
            {"role": "user", "content": JUDGE_PROMPT.format(question=question, gold=gold, response=response)}]}
        for attempt in range(self.retries + 1):
            try:
                self.calls += 1
                r = self._client.post(self.endpoint, json=body)
                if r.status_code < 500:
                    r.raise_for_status()
                    return r.json()["choices"][0]["message"]["content"] or ""
                reason = f"HTTP {r.status_code}"
            except self._httpx.HTTPStatusError as exc:
                log.warning("LLM judge %s refused the request: %s", self.model, exc)
                return None
            except (self._httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if attempt < self.retries:
                time.sleep(0.5 * 2**attempt)
        log.warning("LLM judge %s failed after %d attempt(s): %s", self.model, self.retries + 1, reason)
        return None

    def verdict(self, question: str, gold: str, response: str) -> bool | None:
        """True/False from the cache or the judge; None when the call failed (not cached, so a rerun retries)."""
        hit = self.cached(question, gold, response)
        if hit is not None:
            return hit
        reply = self._ask(question, gold, response)
        if reply is None:
            return None
        correct = parse_judge_reply(reply)
        self._store(self._key(question, gold, response), {"model": self.model, "question": question, "gold": gold,
                                                          "response": response, "reply": reply, "correct": correct})
        return correct

    def verdicts(self, items: list[tuple[str, str, str]]) -> list[bool | None]:
        """Many (question, gold, response) at once, in order; cache hits make no request."""
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(items))) as pool:
            return list(pool.map(lambda it: self.verdict(*it), items))

    def apply(self, record: EvalRecord, response: str | None, verdict: Verdict) -> Verdict:
        """``verdict`` with ``correct`` decided by the judge (on the extracted answer) and ``judge`` set."""
        from medrwr.eval.scoring import extract_answer

        text, _ = extract_answer(response)
        if not text:
            return replace(verdict, correct=False, judge=self.id)
        got = self.verdict(record.question, record.answer, text)
        if got is None:
            return replace(verdict, correct=False, judge=self.id, note="llm judge call failed")
        return replace(verdict, correct=got, judge=self.id)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LLMJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
