"""Reading and checking chat requests: the API's one validation layer, before any model work.

The body is read with ``server.max_body_bytes`` (413 beyond) and parsed by :mod:`.schemas`; here the limits are
checked (message count and length, images, ``max_tokens``), the options read (``medrwr_options`` or ``A. …``
lines of the question) and every image decoded. A broken rule is a 400 naming the field, in the OpenAI
error shape (:class:`medrwr.retrieval.service.errors.APIError`).

What of the conversation is used: the **last user message** is the question (its text parts joined; its
``image_url`` parts are the images). System messages and earlier turns are ignored: the policy needs the
protocol's own system prompt to write its tags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medrwr import protocol
from medrwr.config import RolloutConfig, ServerConfig
from medrwr.retrieval.service.errors import bad
from medrwr.serve.api.images import decode_image, image_bytes
from medrwr.serve.api.schemas import ChatRequest, ImagePart, TextPart


@dataclass
class ChatInput:
    """One checked chat request, ready for the scheduler (``n`` rows of the same question)."""

    question: str
    options: dict[str, str] | list[str] | None
    images: list[Any] = field(default_factory=list)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1
    max_tokens: int | None = None
    cdir: bool = False
    stream: bool = False
    model: str | None = None
    warnings: list[str] = field(default_factory=list)
    """Told to the client in ``medrwr.warnings`` (e.g. images dropped for a text-only policy)."""

    def letters(self) -> str:
        if isinstance(self.options, dict):
            return "".join(self.options)
        if self.options:
            return protocol.OPTION_LETTERS[: len(self.options)]
        return protocol.option_letters_in(self.question)


def _check_options(options: Any) -> dict[str, str] | list[str] | None:
    if options is None:
        return None
    if isinstance(options, dict):
        out = {}
        for k, v in options.items():
            key = str(k).strip().upper()
            if len(key) != 1 or key not in protocol.OPTION_LETTERS:
                raise bad(f"medrwr_options keys must be single letters A-Z, got {k!r}", "invalid_options",
                          "medrwr_options")
            out[key] = str(v)
        items = out
    else:
        items = [str(v) for v in options]
        if len(items) > len(protocol.OPTION_LETTERS):
            raise bad(f"medrwr_options has {len(items)} options; at most {len(protocol.OPTION_LETTERS)}",
                      "invalid_options", "medrwr_options")
    if len(items) < 2:
        raise bad("medrwr_options needs at least two options", "invalid_options", "medrwr_options")
    if any(not str(v).strip() for v in (items.values() if isinstance(items, dict) else items)):
        raise bad("medrwr_options has an empty option text", "invalid_options", "medrwr_options")
    return items


def check_chat(
    req: ChatRequest,
    config: ServerConfig,
    rollout: RolloutConfig,
    *,
    supports_images: bool,
    has_image_index: bool,
    cdir_default: bool = False,
    drop_images: bool = False,
) -> tuple[ChatInput, list[tuple[str, str]]]:
    """Check the cheap rules; return the input (images still undecoded) and the image URLs to decode.

    ``drop_images`` (the demo's text-only default policy): images sent to a text-only policy are ignored with a
    warning instead of refused."""
    if not req.messages:
        raise bad("'messages' is empty: send at least one user message", "empty_messages", "messages")
    if len(req.messages) > config.max_messages:
        raise bad(f"too many messages: {len(req.messages)} > {config.max_messages} (server.max_messages)",
                  "too_many_messages", "messages")
    n_images = 0
    for i, m in enumerate(req.messages):
        parts = m.content if isinstance(m.content, list) else []
        chars = len(m.content) if isinstance(m.content, str) else sum(
            len(p.text) for p in parts if isinstance(p, TextPart))
        if chars > config.max_message_chars:
            raise bad(f"messages[{i}] has {chars} characters; the limit is {config.max_message_chars} "
                      "(server.max_message_chars)", "message_too_long", f"messages[{i}]")
        n_images += sum(isinstance(p, ImagePart) for p in parts)
    if n_images > config.max_images_per_request:
        raise bad(f"too many images: {n_images} > {config.max_images_per_request} (server.max_images_per_request)",
                  "too_many_images", "messages")
    last = next((i for i in range(len(req.messages) - 1, -1, -1) if req.messages[i].role == "user"), None)
    if last is None:
        raise bad("no user message: the last user message holds the question", "no_user_message", "messages")
    msg = req.messages[last]
    if isinstance(msg.content, str):
        text, urls = msg.content, []
    else:
        parts = msg.content or []
        text = "\n".join(p.text for p in parts if isinstance(p, TextPart))
        urls = [(f"messages[{last}].content[{j}].image_url", p.image_url.url)
                for j, p in enumerate(parts) if isinstance(p, ImagePart)]
    if not text.strip():
        raise bad(f"messages[{last}] has no question text", "empty_question", f"messages[{last}]")
    warnings = []
    if urls and not supports_images and drop_images:
        warnings.append(f"{len(urls)} image(s) ignored: this server's policy is text-only (start it with a "
                        "vision-language model, --model, to use images)")
        urls = []
    if urls and not supports_images:
        raise bad("this server's policy is text-only and cannot read images; send the question without images "
                  "or start the server with a vision-language model (--model)", "images_unsupported", "messages")
    budget = req.budget()
    if budget is not None and budget > rollout.max_total_new_tokens:
        raise bad(f"max_tokens {budget} is above this server's limit {rollout.max_total_new_tokens} "
                  "(rollout.max_total_new_tokens)", "max_tokens_too_large", "max_tokens")
    cdir = cdir_default if req.medrwr_cdir is None else bool(req.medrwr_cdir)
    if req.medrwr_cdir and not has_image_index:
        raise bad("medrwr_cdir needs an image index; start the server with --image-index DIR (or demo)",
                  "no_image_index", "medrwr_cdir")
    chat = ChatInput(
        question=text.strip(), options=_check_options(req.medrwr_options), temperature=req.temperature,
        top_p=req.top_p, seed=req.seed, n=req.n, max_tokens=budget, cdir=cdir, stream=req.stream, model=req.model,
        warnings=warnings,
    )
    return chat, urls


def decode_images(urls: list[tuple[str, str]], config: ServerConfig, rollout: RolloutConfig) -> list[Any]:
    """Fetch and decode every image (blocking: run it in a thread)."""
    return [decode_image(image_bytes(url, where, config, config.max_body_bytes), where, config,
                         rollout.max_image_pixels) for where, url in urls]


__all__ = ["ChatInput", "check_chat", "decode_images"]
