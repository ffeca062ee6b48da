"""Image encoders and the (image, report) index that confidence-driven image re-retrieval searches.

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

An index directory (:meth:`ImageIndex.build`)::

    manifest.json     encoder spec and dim, item count, checksums of every file (medrwr.retrieval.store)
    items.jsonl       one row per case: image_id, image (path relative to the index, or absolute when
                      referenced), sha256 of the image bytes, report, metadata
    embeddings.npy    float32 (n, dim), L2-normalised; searched with a FAISS flat inner-product index
    images/           copies of the images (unless built with ``copy_images=False``)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np

from medrwr.retrieval.base import ImageHit
from medrwr.retrieval.dense import l2_normalize

logger = logging.getLogger(__name__)

ImageInput = Union["PIL.Image.Image", str, Path, bytes]  # noqa: F821
ITEMS_FILE = "items.jsonl"
EMB_FILE = "embeddings.npy"
INDEX_KIND = "image-index"


class ImageIndexError(ValueError):
    """An image, a manifest or an image index is unusable; the message says which and what to do."""


class ImageLoadError(ImageIndexError):
    """An image cannot be opened or decoded."""


@runtime_checkable
class ImageEncoder(Protocol):
    """Maps images (and, when ``joint``, texts) to L2-normalised float32 vectors of size ``dim``."""

    name: str
    dim: int
    joint: bool

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 32) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray: ...


# ------------------------------------------------------------------------------------------ image IO


def _describe(x: Any) -> str:
    if isinstance(x, (bytes, bytearray)):
        return f"<{len(x)} bytes starting {bytes(x[:8])!r}>"
    return repr(x) if not isinstance(x, (str, Path)) else str(x)


def _dicom_to_pil(path_or_file: Any) -> Any:
    from PIL import Image

    try:
        import pydicom
    except ImportError as exc:
        raise ImageLoadError(f"{_describe(path_or_file)} is a DICOM file; install pydicom to read it") from exc
    ds = pydicom.dcmread(path_or_file)
    arr = ds.pixel_array.astype(np.float32)
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[arr.shape[0] // 2]  # a volume: take the middle slice
    lo, hi = np.percentile(arr, [0.5, 99.5])
    arr = np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return Image.fromarray(arr.astype(np.uint8))


def load_image(image: ImageInput) -> Any:
    """Open a PIL image, a path (PNG/JPEG/... or DICOM) or raw bytes as an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if len(data) > 132 and data[128:132] == b"DICM":
            return _dicom_to_pil(io.BytesIO(data)).convert("RGB")
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageLoadError(
                f"cannot decode image bytes {_describe(data)}: not a PNG/JPEG/... image ({exc}). "
                "Pass a PIL image, a path, or the raw bytes of an image file."
            ) from None
        return img.convert("RGB")
    if isinstance(image, (str, Path)):
        p = Path(image).expanduser()
        if not p.is_file():
            raise ImageLoadError(f"image file {p} does not exist")
        if p.suffix.lower() in (".dcm", ".dicom"):
            return _dicom_to_pil(p).convert("RGB")
        try:
            with Image.open(p) as img:
                img.load()
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageLoadError(f"cannot read image {p}: {exc}") from None
    raise ImageLoadError(f"unsupported image input of type {type(image).__name__}; pass a PIL image, path or bytes")


# ------------------------------------------------------------------------------------------ encoders


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


# ------------------------------------------------------------------------------------------ the index


@dataclass(frozen=True)
class ImageCase:
    """One (image, report) row of a manifest."""

    image_id: str
    image: str
    report: str
    metadata: dict


def read_image_manifest(manifest: str | Path) -> Iterator[ImageCase]:
    """Read a JSONL or CSV/TSV manifest with columns ``image`` and ``report`` (optional ``id``)."""
    m = Path(manifest)
    if not m.is_file():
        raise ImageIndexError(f"image manifest {m} does not exist")
    suffix = m.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        with open(m, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((i, json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise ImageIndexError(f"{m}:{i}: not valid JSON ({exc.msg})") from None
    elif suffix in (".csv", ".tsv"):
        with open(m, encoding="utf-8", newline="") as f:
            rows = [(i, r) for i, r in enumerate(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","), 2)]
    else:
        raise ImageIndexError(f"{m}: an image manifest must be .jsonl or .csv/.tsv")
    for i, rec in rows:
        if not isinstance(rec, dict) or not rec.get("image"):
            raise ImageIndexError(f"{m}:{i}: each row needs an 'image' path (relative to images_dir) and a 'report'")
        report = rec.get("report", rec.get("caption"))
        if report is None:
            raise ImageIndexError(f"{m}:{i}: row for image {rec['image']!r} has no 'report' (or 'caption')")
        meta = {k: v for k, v in rec.items() if k not in ("id", "image_id", "image", "report", "caption")}
        yield ImageCase(str(rec.get("id") or rec.get("image_id") or Path(str(rec["image"])).stem),
                        str(rec["image"]), str(report), meta)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ImageIndex:
    """(image, report) pairs with their embeddings; searched by cosine similarity (FAISS flat IP)."""

    def __init__(self, path: Path, items: list[dict], embeddings: np.ndarray, encoder: ImageEncoder):
        import faiss

        self.path = path
        self.items = items
        self.embeddings = embeddings
        self.encoder = encoder
        self._faiss = faiss.IndexFlatIP(int(embeddings.shape[1]))
        if len(embeddings):
            self._faiss.add(np.ascontiguousarray(embeddings, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def build(cls, manifest: str | Path, out_dir: str | Path, images_dir: str | Path | None = None,
              encoder: ImageEncoder | str = "pixel-stats", copy_images: bool = True, batch_size: int = 32) -> Path:
        """Encode every manifest image and write the index directory atomically; returns its path."""
        from medrwr.retrieval.store import atomic_index_dir, write_manifest

        manifest = Path(manifest)
        base = Path(images_dir) if images_dir is not None else manifest.parent
        enc = load_image_encoder(encoder)
        cases = list(read_image_manifest(manifest))
        if not cases:
            raise ImageIndexError(f"image manifest {manifest} has no rows")
        seen: set[str] = set()
        for c in cases:
            if c.image_id in seen:
                raise ImageIndexError(f"{manifest}: duplicate image id {c.image_id!r}; give each row a unique 'id'")
            seen.add(c.image_id)
            if not (base / c.image).is_file():
                raise ImageIndexError(f"{manifest}: image {c.image!r} (id {c.image_id!r}) not found at {base / c.image}")
        with atomic_index_dir(out_dir) as tmp:
            items, embs = [], []
            for s in range(0, len(cases), batch_size):
                batch = cases[s:s + batch_size]
                datas = [(base / c.image).read_bytes() for c in batch]
                try:
                    embs.append(enc.encode_images([base / c.image for c in batch], batch_size=batch_size))
                except ImageLoadError as exc:
                    raise ImageIndexError(f"{manifest}: {exc}") from None
                for c, data in zip(batch, datas):
                    digest = _sha256_bytes(data)
                    if copy_images:
                        rel = f"images/{digest[:12]}_{Path(c.image).name}"
                        (tmp / "images").mkdir(exist_ok=True)
                        (tmp / rel).write_bytes(data)
                        ref = rel
                    else:
                        ref = str((base / c.image).resolve())
                    items.append({"image_id": c.image_id, "image": ref, "copied": copy_images,
                                  "sha256": digest, "report": c.report, "metadata": c.metadata})
            emb = np.concatenate(embs).astype(np.float32)
            np.save(tmp / EMB_FILE, emb, allow_pickle=False)
            with open(tmp / ITEMS_FILE, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
            write_manifest(tmp, {"kind": INDEX_KIND, "encoder": enc.name, "dim": int(emb.shape[1]),
                                 "joint": bool(enc.joint), "num_images": len(items),
                                 "source_manifest": str(manifest.name)})
        logger.info("image index: %d images encoded with %s -> %s", len(items), enc.name, out_dir)
        return Path(out_dir)

    @classmethod
    def load(cls, path: str | Path, encoder: ImageEncoder | str | None = None) -> ImageIndex:
        from medrwr.retrieval.store import load_manifest

        p = Path(path).expanduser()
        manifest = load_manifest(p, verify=True)
        if manifest.get("kind") != INDEX_KIND:
            raise ImageIndexError(f"{p} is not an image index (kind={manifest.get('kind')!r}); build one with "
                                  "ImageIndex.build(manifest, out_dir)")
        enc = load_image_encoder(encoder if encoder is not None else manifest["encoder"])
        if enc.dim != manifest["dim"] or (encoder is not None and enc.name != manifest["encoder"]):
            raise ImageIndexError(
                f"image index {p} was built with encoder {manifest['encoder']!r} (dim {manifest['dim']}); "
                f"got {enc.name!r} (dim {enc.dim}). Load it with the same encoder or rebuild the index."
            )
        with open(p / ITEMS_FILE, encoding="utf-8") as f:
            items = [json.loads(line) for line in f if line.strip()]
        emb = np.load(p / EMB_FILE, allow_pickle=False)
        if len(items) != len(emb):
            raise ImageIndexError(f"image index {p}: {len(items)} items but {len(emb)} embeddings; rebuild it")
        return cls(p.absolute(), items, emb, enc)

    def _abs(self, item: dict) -> str:
        return str(self.path / item["image"]) if item.get("copied", True) else item["image"]

    def search_images(self, images: Sequence[ImageInput], k: int = 1) -> list[list[ImageHit]]:
        """Top-``k`` most similar indexed cases for each query image, best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not len(images) or not self.items:
            return [[] for _ in images]
        q = self.encoder.encode_images(list(images))
        scores, idx = self._faiss.search(np.ascontiguousarray(q, dtype=np.float32), min(k, len(self.items)))
        out = []
        for srow, irow in zip(scores, idx):
            hits = []
            for s, i in zip(srow, irow):
                if i < 0:
                    continue
                it = self.items[int(i)]
                hits.append(ImageHit(image_id=it["image_id"], image_path=self._abs(it), report=it["report"],
                                     score=float(s), metadata=dict(it.get("metadata") or {})))
            out.append(hits)
        return out


# ------------------------------------------------------------------------------------------ demo index

_DEMO_CASES = [
    # (package, loader name, file name, report)
    ("skimage", "retina", "retina.png",
     "Colour fundus photograph of a human retina showing the optic disc, macula and retinal blood vessels."),
    ("skimage", "microaneurysms", "microaneurysms.png",
     ("Grayscale crop of a retinal fundus image with microaneurysms, small red dots typical of diabetic "
      "retinopathy.")),
    ("skimage", "immunohistochemistry", "ihc.png",
     ("Immunohistochemistry (IHC) slide of human tissue stained with hematoxylin (nuclei, blue) and DAB "
      "(brown), light microscopy.")),
    ("skimage", "cell", "cell.png",
     "Light-microscopy image of a single cell (human cell line) used for segmentation examples."),
    ("pydicom", "CT_small.dcm", "ct_small.png",
     "Axial computed tomography (CT) slice, small 128x128 test image from the pydicom sample data."),
    ("pydicom", "MR_small.dcm", "mr_small.png",
     "Magnetic resonance (MR) image slice, small 64x64 test image from the pydicom sample data."),
]


def _demo_image(package: str, name: str) -> Any:
    from PIL import Image

    if package == "skimage":
        import skimage.data

        arr = getattr(skimage.data, name)()
        return Image.fromarray(np.asarray(arr)).convert("RGB")
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(name)
    return _dicom_to_pil(path).convert("RGB")


def default_demo_image_index_path() -> Path:
    from medrwr.retrieval.static import cache_root

    return cache_root() / "indexes" / "demo-images-v1"


def build_demo_image_index(out_dir: str | Path | None = None, encoder: ImageEncoder | str = "pixel-stats") -> Path:
    """Build a small image index from real images that install offline (scikit-image, pydicom).

    Uses whichever of those packages are installed; raises :class:`ImageIndexError` naming them when
    neither is. Reports are short factual descriptions of each sample image.
    """
    import tempfile

    from medrwr._imports import is_available

    have = {p for p in ("skimage", "pydicom") if is_available(p)}
    if not have:
        raise ImageIndexError("the demo image index needs real sample images from scikit-image and/or pydicom; "
                              "install them with: pip install scikit-image pydicom")
    out = Path(out_dir) if out_dir is not None else default_demo_image_index_path()
    with tempfile.TemporaryDirectory(prefix="medrwr-demo-images-") as tmp:
        rows = []
        for package, name, fname, report in _DEMO_CASES:
            if package not in have:
                continue
            try:
                img = _demo_image(package, name)
            except (ImportError, AttributeError, OSError, ValueError) as exc:  # sample missing in this version
                logger.warning("demo image %s/%s unavailable (%s); skipping", package, name, exc)
                continue
            img.save(Path(tmp) / fname)
            rows.append({"id": Path(fname).stem, "image": fname, "report": report,
                         "origin": f"{package}:{name}"})
        if not rows:
            raise ImageIndexError("no demo images could be loaded from scikit-image or pydicom")
        (Path(tmp) / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return ImageIndex.build(Path(tmp) / "manifest.jsonl", out, encoder=encoder)


__all__ = [
    "HFClipEncoder",
    "ImageEncoder",
    "ImageIndex",
    "ImageIndexError",
    "ImageLoadError",
    "OpenClipEncoder",
    "PixelStatsEncoder",
    "build_demo_image_index",
    "load_image",
    "load_image_encoder",
    "read_image_manifest",
]
