"""Pydantic models of the chat-completions request (OpenAI's schema plus the ``medrwr_*`` extension fields).

Responses are plain dicts built in :mod:`medrwr.serve.api.views` (their shape is the OpenAI one, documented in
docs/serving.md). Unknown top-level fields (``user``, ``stream_options``…) are ignored, as OpenAI-compatible
servers do; unknown content part types are refused.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")

    url: str
    detail: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["image_url"]
    image_url: ImageURL


Part = Union[TextPart, ImagePart]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``. ``max_tokens`` (or ``max_completion_tokens``) caps the rollout's model tokens."""

    model_config = ConfigDict(extra="ignore")

    messages: list[Message]
    model: str | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=8)
    medrwr_options: dict[str, str] | list[str] | None = None
    medrwr_cdir: bool | None = None

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def to_jsonable(value: Any) -> Any:
    """Floats that JSON can carry (NaN/inf become None)."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


__all__ = ["ChatRequest", "ImagePart", "ImageURL", "Message", "TextPart", "to_jsonable"]
