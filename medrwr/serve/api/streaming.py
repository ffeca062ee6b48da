"""Server-sent events of a streamed chat completion (the contract is in docs/serving.md).

Every frame is an unnamed ``data:`` frame holding a ``chat.completion.chunk``: openai's client (3.x,
``openai/_streaming.py``) turns any frame whose event name does not start with ``thread.`` into a chunk, so
MedRwR events ride inside chunks (``medrwr_event``) with an empty delta instead of as named SSE events.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


class Detokenizer:
    """Incremental decoding of one row's model tokens: text appears once its bytes form whole characters.

    Decodes a short window (``prefix``..end) per token, as vLLM's detokenizer does, never the whole completion.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        dec = self.tokenizer.decode
        before = dec(self.ids[self.prefix : self.read], skip_special_tokens=False)
        now = dec(self.ids[self.prefix :], skip_special_tokens=False)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""


class ChunkWriter:
    """Formats the frames of one streamed completion."""

    def __init__(self, rid: str, created: int, model: str):
        self.base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

    @staticmethod
    def frame(data: Any) -> bytes:
        return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"

    def chunk(self, index: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self.frame({**self.base, "choices": [choice], **extra})

    def role(self, index: int) -> bytes:
        return self.chunk(index, {"role": "assistant", "content": ""})

    def reasoning(self, index: int, text: str) -> bytes:
        return self.chunk(index, {"reasoning_content": text})

    def event(self, index: int, name: str, data: Any) -> bytes:
        return self.chunk(index, {}, medrwr_event={"event": name, "index": index, "data": data})

    def content(self, index: int, text: str) -> bytes:
        return self.chunk(index, {"content": text})

    def finish(self, index: int, reason: str, usage: dict[str, int] | None = None) -> bytes:
        extra = {"usage": usage} if usage is not None else {}
        return self.chunk(index, {}, reason, **extra)

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return ChunkWriter.frame(body)

    DONE = b"data: [DONE]\n\n"


__all__ = ["ChunkWriter", "Detokenizer"]
