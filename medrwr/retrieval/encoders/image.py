"""Image encoders for the image–report index and the image query reward.

Encoders (:func:`load_image_encoder` specs):

- ``hf:<path or hub id>`` — :class:`HFClipEncoder`: a transformers model with ``get_image_features`` /
  ``get_text_features`` (CLIP, SigLIP, ...), joint image-text space.
- ``open_clip:<id>`` — :class:`OpenClipEncoder` (extra ``clip``), e.g.
  ``open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` as in the paper.
- ``pixel-stats`` — :class:`PixelStatsEncoder`: a NON-LEARNED image feature (grayscale thumbnail,
  intensity and gradient histograms). Image-to-image only; the offline default for the demo index,
  because no CLIP-family weights install offline. It finds near-duplicates and images of similar
  appearance, not similar findings.
- a folder path holding a transformers CLIP config is read as ``hf:<folder>``.

"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np

from medrwr.errors import ImageIndexError
from medrwr.retrieval.encoders.text import l2_normalize
from medrwr.retrieval.image_io import load_image

logger = logging.getLogger(__name__)

ImageInput = Union["PIL.Image.Image", str, Path, bytes]  # noqa: F821


@runtime_checkable
class ImageEncoder(Protocol):
    """Maps images (and, when ``joint``, texts) to L2-normalised float32 vectors of size ``dim``."""

    name: str
    dim: int
    joint: bool

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 32) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray: ...




class PixelStatsEncoder:
    """``pixel-stats-v1``: a non-learned image descriptor for image-to-image search (no text side).

    Concatenates a standardised 32x32 grayscale thumbnail (layout), a 32-bin intensity histogram
    (contrast/modality) and a magnitude-weighted 8-orientation x 4-magnitude gradient histogram
    (texture), each block L2-normalised and weighted, then L2-normalises the whole vector.
    """

    name = "pixel-stats-v1"
    joint = False
    _THUMB = 32
    dim = _THUMB * _THUMB + 32 + 32

    def _one(self, image: ImageInput) -> np.ndarray:
        from PIL import Image

        img = load_image(image).convert("L")
        thumb = np.asarray(img.resize((self._THUMB, self._THUMB), Image.Resampling.BILINEAR), dtype=np.float32)
        t = thumb.ravel() - thumb.mean()
        t /= max(float(np.linalg.norm(t)), 1e-6)
        small = np.asarray(img.resize((128, 128), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        hist = np.histogram(small, bins=32, range=(0.0, 1.0))[0].astype(np.float32)
        hist = np.sqrt(hist / max(hist.sum(), 1.0))
        gy, gx = np.gradient(small)
        mag = np.hypot(gx, gy)
        ori = (np.arctan2(gy, gx) % np.pi) / np.pi  # orientation in [0, 1)
        mbin = np.clip(np.digitize(mag, [0.01, 0.05, 0.15]), 0, 3)
        obin = np.clip((ori * 8).astype(int), 0, 7)
        grad = np.bincount((obin * 4 + mbin).ravel(), weights=mag.ravel(), minlength=32).astype(np.float32)
        grad = np.sqrt(grad / max(grad.sum(), 1e-6))
        v = np.concatenate([t, 0.7 * hist / max(np.linalg.norm(hist), 1e-6),
                            0.7 * grad / max(np.linalg.norm(grad), 1e-6)])
        return v.astype(np.float32)

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        if not len(images):
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalize(np.stack([self._one(im) for im in images]))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        raise NotImplementedError(
            "pixel-stats-v1 is an image-only, non-learned feature: it cannot embed text. Configure a joint "
            "image-text encoder (e.g. 'open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224' "
            "or 'hf:<CLIP folder>') for text-to-image scores such as the image-query reward."
        )


def _features(out: Any) -> Any:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for attr in ("image_embeds", "text_embeds", "pooler_output"):
        val = getattr(out, attr, None)
        if isinstance(val, torch.Tensor):
            return val
    raise ImageIndexError(f"cannot read features from model output of type {type(out).__name__}")


class HFClipEncoder:
    """A transformers image-text model (CLIP, SigLIP, ...) from a local folder or hub id; joint space."""

    joint = True

    def __init__(self, path_or_id: str | Path, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoProcessor

        self.source = str(path_or_id)
        self.name = f"hf:{self.source}"
        try:
            self.model = AutoModel.from_pretrained(self.source).eval().to(device)
            self.processor = AutoProcessor.from_pretrained(self.source)
        except OSError as exc:
            raise ImageIndexError(
                f"cannot load image-text model {self.source!r}: {exc}. Give a local folder or a hub id "
                "(downloads need network access; set HF_HUB_OFFLINE=0)."
            ) from None
        if not hasattr(self.model, "get_image_features"):
            raise ImageIndexError(f"{self.source!r} is not an image-text model (no get_image_features)")
        self.device = device
        self._torch = torch
        cfg = self.model.config
        self.dim = int(getattr(cfg, "projection_dim", 0) or self._probe_dim())

    def _probe_dim(self) -> int:
        from PIL import Image

        return int(self.encode_images([Image.new("RGB", (32, 32))]).shape[1])

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        outs = []
        with self._torch.inference_mode():
            for s in range(0, len(images), batch_size):
                pil = [load_image(x) for x in images[s:s + batch_size]]
                inputs = self.processor(images=pil, return_tensors="pt").to(self.device)
                outs.append(_features(self.model.get_image_features(pixel_values=inputs["pixel_values"])).float().cpu().numpy())
        return l2_normalize(np.concatenate(outs)) if outs else np.zeros((0, getattr(self, "dim", 0)), np.float32)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        outs = []
        with self._torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                inputs = self.processor(text=list(texts[s:s + batch_size]), return_tensors="pt", padding=True,
                                        truncation=True).to(self.device)
                kw = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
                outs.append(_features(self.model.get_text_features(**kw)).float().cpu().numpy())
        return l2_normalize(np.concatenate(outs)) if outs else np.zeros((0, self.dim), np.float32)


class OpenClipEncoder:
    """An open_clip model (extra ``clip``), e.g. BiomedCLIP: ``hf-hub:microsoft/BiomedCLIP-...`` or ``local-dir:/path``.

    Not exercised by the offline tests (no weights install offline); it is a thin wrapper over
    ``open_clip.create_model_and_transforms`` / ``get_tokenizer``.
    """

    joint = True

    def __init__(self, model_id: str, device: str = "cpu"):
        from medrwr._imports import require

        open_clip = require("open_clip", "clip", "open_clip image encoders such as BiomedCLIP")
        import torch

        self.name = f"open_clip:{model_id}"
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_id, device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_id)
        self.device = device
        self._torch = torch
        self.dim = int(self.encode_texts(["x"]).shape[1])

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        outs = []
        with self._torch.inference_mode():
            for s in range(0, len(images), batch_size):
                x = self._torch.stack([self.preprocess(load_image(im)) for im in images[s:s + batch_size]])
                outs.append(self.model.encode_image(x.to(self.device)).float().cpu().numpy())
        return l2_normalize(np.concatenate(outs)) if outs else np.zeros((0, self.dim), np.float32)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        outs = []
        with self._torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                tok = self.tokenizer(list(texts[s:s + batch_size])).to(self.device)
                outs.append(self.model.encode_text(tok).float().cpu().numpy())
        return l2_normalize(np.concatenate(outs))


def load_image_encoder(spec: str | ImageEncoder) -> ImageEncoder:
    """Resolve ``pixel-stats`` | ``hf:<path or id>`` | ``open_clip:<id>`` | a folder with a CLIP config."""
    if not isinstance(spec, str):
        return spec
    s = spec.strip()
    if s in ("pixel-stats", "pixel-stats-v1"):
        return PixelStatsEncoder()
    if s.startswith("hf:"):
        return HFClipEncoder(s[3:])
    if s.startswith("open_clip:"):
        return OpenClipEncoder(s[len("open_clip:"):])
    p = Path(s).expanduser()
    if p.is_dir() and (p / "open_clip_config.json").is_file():
        return OpenClipEncoder(f"local-dir:{p}")
    if p.is_dir() and (p / "config.json").is_file():
        return HFClipEncoder(p)
    raise ImageIndexError(
        f"unknown image encoder {spec!r}: use 'pixel-stats', 'hf:<CLIP folder or hub id>', "
        "'open_clip:<model id>' (e.g. open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224) "
        "or a folder holding a CLIP config.json"
    )
