"""The (image, report) index that confidence-driven image re-retrieval (CDIR) searches.

An index directory (:meth:`ImageIndex.build`)::

    manifest.json     encoder spec and dim, item count, checksums of every file (medrwr.retrieval.index.store)
    items.jsonl       one row per case: image_id, image (path relative to the index, or absolute when
                      referenced), sha256 of the image bytes, report, metadata
    embeddings.npy    float32 (n, dim), L2-normalised; searched with a FAISS flat inner-product index
    images/           copies of the images (unless built with ``copy_images=False``)
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from medrwr.errors import ImageIndexError, ImageLoadError
from medrwr.retrieval.base import ImageHit, ImageRetriever
from medrwr.retrieval.encoders.image import ImageEncoder, load_image_encoder
from medrwr.retrieval.image_io import dicom_to_pil

logger = logging.getLogger(__name__)

ITEMS_FILE = "items.jsonl"
EMB_FILE = "embeddings.npy"
INDEX_KIND = "image-index"

ImageInput = Union["PIL.Image.Image", str, Path, bytes]  # noqa: F821




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


class ImageIndex(ImageRetriever):
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

    @property
    def doc_count(self) -> int:
        return len(self.items)

    def describe(self) -> dict[str, Any]:
        return {"kind": "image-index", "doc_count": self.doc_count, "encoder": self.encoder.name,
                "path": str(self.path)}

    @classmethod
    def build(cls, manifest: str | Path, out_dir: str | Path, images_dir: str | Path | None = None,
              encoder: ImageEncoder | str = "pixel-stats", copy_images: bool = True, batch_size: int = 32) -> Path:
        """Encode every manifest image and write the index directory atomically; returns its path."""
        from medrwr.retrieval.index.store import atomic_index_dir, write_manifest

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
        from medrwr.retrieval.index.store import load_manifest

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
    return dicom_to_pil(path).convert("RGB")


def default_demo_image_index_path() -> Path:
    from medrwr.assets import cache_root

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
    "ImageCase",
    "ImageIndex",
    "build_demo_image_index",
    "default_demo_image_index_path",
    "read_image_manifest",
]
