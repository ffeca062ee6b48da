"""What goes into a rollout: one question (:class:`RolloutRequest`) and the helpers that turn it into a prompt.

Kept apart from the loop so the engine module holds the loop only; :mod:`medrwr.rollout.engine` re-exports
:class:`RolloutRequest` because callers build requests for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrwr import protocol

__all__ = ["RolloutRequest", "image_ref", "images_in", "load_image"]


def load_image(image: Any, max_pixels: int | None = None) -> Any:
    """A PIL RGB image (PIL image, path, DICOM or bytes; see ``retrieval.image_io.load_image``), downscaled to at
    most ``max_pixels`` with its aspect kept."""
    from medrwr.retrieval.image_io import load_image as open_image

    img = open_image(image)
    if max_pixels and img.width * img.height > max_pixels:
        scale = math.sqrt(max_pixels / (img.width * img.height))
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))
    return img


def image_ref(image: Any) -> str:
    """How a trace names an image: its path, its file name, or a short description of an in-memory image."""
    if isinstance(image, (str, Path)):
        return str(image)
    name = getattr(image, "filename", "") or ""
    if name:
        return str(name)
    size = getattr(image, "size", None)
    return f"<in-memory image {size[0]}x{size[1]}>" if size else "<in-memory image>"


@dataclass
class RolloutRequest:
    """One question: image(s), question text, options. Or ready-made chat ``messages`` (TRL prompts)."""

    question: str = ""
    options: Sequence[str] | dict[str, str] | None = None
    images: Sequence[Any] = ()
    messages: list[dict[str, Any]] | None = None
    request_id: str | None = None
    system: str | None = None
    """System prompt; None uses the protocol's (image or text variant)."""
    metadata: dict[str, Any] = field(default_factory=dict)

    def option_letters(self) -> str:
        if self.options:
            keys = list(self.options.keys()) if isinstance(self.options, dict) else None
            if keys is not None:
                return "".join(str(k).strip().upper()[:1] for k in keys)
            return protocol.OPTION_LETTERS[: len(self.options)]
        if self.messages is not None:
            return protocol.option_letters_in(last_user_text(self.messages))
        return protocol.option_letters_in(self.question)


def last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    """The text parts of the last user message."""
    for m in reversed(messages):
        if m.get("role") == "user":
            c = m.get("content", "")
            if isinstance(c, str):
                return c
            return "\n".join(str(p.get("text", "")) for p in c if isinstance(p, dict) and p.get("type") == "text")
    return ""


def images_in(messages: Sequence[dict[str, Any]]) -> list[Any]:
    """The image objects of chat messages, in order (TRL's image parts carry PIL images)."""
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, list):
            for p in c:
                if isinstance(p, dict) and (p.get("type") == "image" or "image" in p) and p.get("image") is not None:
                    out.append(p["image"])
    return out
