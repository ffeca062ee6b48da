"""Load tokenizers and Qwen2.5-VL processors the same way for real checkpoints and test folders.

transformers 5.x type-checks every sub-processor of ``Qwen2_5_VLProcessor``, so one cannot be built without a
video processor (and the Qwen2-VL video processor needs torchvision, which is unusable beside the CPU torch
wheel). :class:`Qwen2_5_VLImageProcessor` is the same processor without the video part; it round-trips through
its own ``from_pretrained`` (``AutoProcessor`` does not know it: pass the loaded processor explicitly, e.g. as
TRL's ``processing_class``). :func:`load_processor` uses ``AutoProcessor`` when it can (real checkpoints on a
machine with torchvision) and this class otherwise.

transformers is imported on first use, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from medrwr.errors import BackendError

logger = logging.getLogger(__name__)

__all__ = ["Qwen2_5_VLImageProcessor", "load_processor", "load_tokenizer", "make_processor"]  # noqa: F822 (lazy)

_IMAGE_ONLY = "Qwen2_5_VLImageProcessor"
#: Processors whose AutoProcessor load builds a video processor, which needs torchvision.
_NEEDS_TORCHVISION = {"Qwen2VLProcessor", "Qwen2_5_VLProcessor"}


@lru_cache(maxsize=1)
def _image_only_class() -> type:
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2_5_VLImageProcessor(Qwen2_5_VLProcessor):
        """``Qwen2_5_VLProcessor`` for images and text only (no video processor)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            if tokenizer is None:
                raise ValueError("Qwen2_5_VLImageProcessor needs a tokenizer")
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = getattr(
                tokenizer, "image_token_id", None
            ) or tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = getattr(
                tokenizer, "video_token_id", None
            ) or tokenizer.convert_tokens_to_ids(self.video_token)
            self.video_processor = None
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def __call__(self, images=None, text=None, videos=None, **kwargs):
            if videos is not None:
                raise ValueError(
                    "this processor has no video processor; load the checkpoint with AutoProcessor for videos"
                )
            return super().__call__(images=images, text=text, **kwargs)

    Qwen2_5_VLImageProcessor.__module__ = __name__
    Qwen2_5_VLImageProcessor.__qualname__ = _IMAGE_ONLY
    return Qwen2_5_VLImageProcessor


def __getattr__(name: str) -> Any:
    if name == _IMAGE_ONLY:
        return _image_only_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_processor(image_processor: Any, tokenizer: Any, chat_template: str | None = None) -> Any:
    """A :class:`Qwen2_5_VLImageProcessor` from parts (the chat template defaults to the tokenizer's)."""
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    return _image_only_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def _recorded_class(path: Path) -> str | None:
    """The processor class a local folder was saved with, if it says."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        try:
            value = json.loads((path / name).read_text()).get("processor_class")
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            return str(value)
    return None


def _no_bpe_cleanup(tokenizer: Any) -> Any:
    """Set ``clean_up_tokenization_spaces=False`` where transformers ignores it anyway (BPE tokenizers).

    transformers 5 skips that clean-up for BPE models (it would strip real spaces) and warns on the first
    decode of every process; False decodes identically without the warning. WordPiece tokenizers keep theirs.
    """
    tok = getattr(tokenizer, "tokenizer", None) or tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if (
        getattr(tok, "clean_up_tokenization_spaces", False)
        and backend is not None
        and type(backend.model).__name__ == "BPE"
        and not getattr(tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    ):
        tok.clean_up_tokenization_spaces = False
    return tokenizer


def load_tokenizer(path_or_id: str | os.PathLike, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` with left padding set at construction (TRL's log-probs need it).

    A BPE tokenizer's ignored ``clean_up_tokenization_spaces`` is turned off (same output, no warning).
    """
    from transformers import AutoTokenizer

    kwargs.setdefault("padding_side", "left")
    return _no_bpe_cleanup(AutoTokenizer.from_pretrained(str(path_or_id), **kwargs))


def load_processor(path_or_id: str | os.PathLike, **kwargs: Any) -> Any:
    """The processor of a vision-language checkpoint, or its tokenizer for a text-only one.

    Local folders without an image processor config are text-only and get :func:`load_tokenizer`. Folders
    saved by :class:`Qwen2_5_VLImageProcessor` load with it. Anything else (real checkpoints, hub ids) tries
    ``AutoProcessor`` first; when that fails (e.g. the video processor needs torchvision) or returns only a
    tokenizer, the checkpoint loads with :class:`Qwen2_5_VLImageProcessor`. Padding is left by default.
    """
    from transformers.processing_utils import ProcessorMixin

    path = Path(path_or_id).expanduser()
    local = path.is_dir()
    if not local and (str(path_or_id).startswith((".", "/", "~")) or path.exists()):
        raise FileNotFoundError(f"no checkpoint folder at {path_or_id}")
    if local and not (
        {"preprocessor_config.json", "processor_config.json"} & {p.name for p in path.iterdir()}
    ):
        logger.info("%s has no image processor: loading its tokenizer only", path)
        return load_tokenizer(path, **kwargs)
    kwargs.setdefault("padding_side", "left")
    source = str(path) if local else str(path_or_id)
    recorded = _recorded_class(path) if local else None
    if recorded in _NEEDS_TORCHVISION:
        from transformers.utils import is_torchvision_available

        if not is_torchvision_available():
            recorded = _IMAGE_ONLY  # AutoProcessor would fail on the video processor: skip the attempt
    if recorded != _IMAGE_ONLY:
        from transformers import AutoProcessor

        try:
            proc = AutoProcessor.from_pretrained(source, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure here has a fallback; its error is logged
            logger.info(
                "AutoProcessor failed for %s (%s: %s); using %s", source, type(exc).__name__, exc, _IMAGE_ONLY
            )
        else:
            if isinstance(proc, ProcessorMixin) and getattr(proc, "image_processor", None) is not None:
                return _no_bpe_cleanup(proc)
            logger.info("AutoProcessor gave no image processor for %s; using %s", source, _IMAGE_ONLY)
    return _no_bpe_cleanup(_image_only_class().from_pretrained(source, **kwargs))


# ---------------------------------------------------------------------- prompts shared by the backends


def _has_image_parts(messages: Sequence[dict[str, Any]]) -> bool:
    return any(
        isinstance(m.get("content"), list) and any(isinstance(p, dict) and p.get("type") == "image" for p in m["content"])
        for m in messages
    )


def render_chat(processor: Any, messages: list[dict[str, Any]], supports_images: bool) -> tuple[list[int], Any]:
    """Prompt ids from the chat template (+ the processor's image tensors for a VLM prompt with images).

    For a VLM the ids are exactly ``processor.apply_chat_template(messages, add_generation_prompt=True,
    tokenize=True)``, which TRL relies on when it rebuilds ``pixel_values`` from the dataset images.
    """
    if supports_images and any(isinstance(m.get("content"), list) for m in messages):
        enc = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        return [int(x) for x in enc["input_ids"][0].tolist()], enc
    if _has_image_parts(messages):
        raise BackendError(
            "this policy is text-only but the prompt has images: pass a vision-language model "
            "(e.g. --model Qwen/Qwen2.5-VL-7B-Instruct or a local Qwen2.5-VL folder)"
        )
    tokenizer = getattr(processor, "tokenizer", None) or processor
    flat = [
        {**m, "content": m["content"] if isinstance(m.get("content"), str)
         else "".join(str(p.get("text", "")) for p in m.get("content", []) if isinstance(p, dict))}
        for m in messages
    ]
    if not getattr(tokenizer, "chat_template", None):
        raise BackendError("the tokenizer has no chat template; use an instruct (chat) checkpoint")
    enc = tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=True)
    if hasattr(enc, "keys"):
        enc = enc["input_ids"]
    if enc and isinstance(enc[0], list):
        enc = enc[0]
    return [int(x) for x in enc], None


def image_placeholder_ids(processor: Any, image: Any) -> tuple[list[int], Any]:
    """``<|vision_start|>`` + ``<|image_pad|>`` × n + ``<|vision_end|>`` for one image, and its processor output.

    ``n = prod(image_grid_thw) / merge_size²``, the same expansion the processor applies to a chat prompt.
    """
    tokenizer = getattr(processor, "tokenizer", None) or processor
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise BackendError("this processor has no image processor: the policy is text-only")
    out = image_processor(images=[image], return_tensors="pt")
    merge = int(getattr(image_processor, "merge_size", 2))
    n = int(out["image_grid_thw"][0].prod()) // (merge * merge)
    vocab = tokenizer.get_vocab()
    image_token = getattr(processor, "image_token", None) or "<|image_pad|>"
    ids = [vocab.get("<|vision_start|>"), vocab.get(image_token), vocab.get("<|vision_end|>")]
    if None in ids:
        raise BackendError("the tokenizer lacks <|vision_start|>, <|image_pad|> or <|vision_end|>")
    return [ids[0]] + [ids[1]] * n + [ids[2]], out


class RawImagePrompts:
    """``eos_token_ids``, ``prepare_prompt`` and ``encode_image`` for backends whose server runs the image
    processor itself (vLLM, verl): prompt ids from the chat template, images passed on raw. Needs
    ``self.processor``, ``self.supports_images`` and ``self._eos``."""

    processor: Any
    supports_images: bool
    _eos: set[int]

    def eos_token_ids(self) -> set[int]:
        return set(self._eos)

    def prepare_prompt(self, messages: list[dict[str, Any]], images: Sequence[Any] = ()) -> Any:
        """The chat template's ids (for a VLM ``processor.apply_chat_template(..., tokenize=True)``, as TRL)."""
        return raw_prompt_inputs(self.processor, messages, images, self.supports_images)

    def encode_image(self, image: Any) -> tuple[list[int], Any]:
        return raw_image_inputs(self.processor, image, self.supports_images)


def raw_prompt_inputs(processor: Any, messages: list[dict[str, Any]], images: Sequence[Any],
                      supports_images: bool) -> Any:
    """Prompt ids + the raw images, for backends whose server runs the image processor itself (vLLM, verl)."""
    from medrwr.rollout.backends.base import MultimodalInputs, PromptInputs

    ids, _ = render_chat(processor, messages, supports_images)
    mm = MultimodalInputs(images=list(images), data={"image": list(images)}) if images else None
    return PromptInputs(prompt_ids=ids, mm=mm)


def raw_image_inputs(processor: Any, image: Any, supports_images: bool) -> tuple[list[int], Any]:
    """One inserted image's placeholder ids + the raw image (CDIR), for the same backends."""
    from medrwr.rollout.backends.base import MultimodalInputs

    if not supports_images:
        raise BackendError("CDIR inserts an image, which needs a vision-language model")
    ids, _ = image_placeholder_ids(processor, image)
    return ids, MultimodalInputs(images=[image], data={"image": [image]})
