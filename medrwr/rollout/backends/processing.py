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
from functools import lru_cache
from pathlib import Path
from typing import Any

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


def load_tokenizer(path_or_id: str | os.PathLike, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` with left padding set at construction (TRL's log-probs need it)."""
    from transformers import AutoTokenizer

    kwargs.setdefault("padding_side", "left")
    return AutoTokenizer.from_pretrained(str(path_or_id), **kwargs)


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
                return proc
            logger.info("AutoProcessor gave no image processor for %s; using %s", source, _IMAGE_ONLY)
    return _image_only_class().from_pretrained(source, **kwargs)
