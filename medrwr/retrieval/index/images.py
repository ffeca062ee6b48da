"""The (image, report) index that confidence-driven image re-retrieval (CDIR) searches.

An index directory (:meth:`ImageIndex.build`)::

    manifest.json     encoder spec and dim, item count, checksums of every file (medrwr.retrieval.index.store)
    items.jsonl       one row per case: image_id, image (path relative to the index, or absolute when
                      referenced), sha256 of the image bytes, report, metadata
    embeddings.npy    float32 (n, dim), L2-normalised; searched with a FAISS flat inner-product index
    images/           copies of the images (unless built with ``copy_images=False``)

The reports file (``medrwr index build-images --images DIR --reports FILE``; :func:`read_image_manifest`)
maps each image to its report, one row per case:

- ``.jsonl``/``.ndjson``: one object per line, ``{"image": "case1.png", "report": "Enlarged heart ..."}``;
- ``.json``: a list of such objects, or one object ``{"case1.png": "Enlarged heart ...", ...}``;
- ``.csv``/``.tsv``: a header row naming the columns, then one row per case.

``image`` is the file's path relative to the images folder (or absolute); ``file``, ``filename`` and
``path`` are accepted for it, ``caption``, ``findings`` and ``text`` for ``report``. ``id`` (or
``image_id``) names the case (default: the file name without extension); every other column is kept as
metadata. Images may be PNG, JPEG, BMP, GIF, TIFF, WebP or DICOM.
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
DEMO_NAME = "demo"
"""``cdir.image_index=demo`` names the shipped demo image index (a folder called demo: ``./demo``)."""
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".dcm", ".dicom"})

ImageInput = Union["PIL.Image.Image", str, Path, bytes]  # noqa: F821

_IMAGE_KEYS = ("image", "file", "filename", "file_name", "image_path", "path")
_REPORT_KEYS = ("report", "caption", "findings", "text")
_ID_KEYS = ("id", "image_id")


@dataclass(frozen=True)
class ImageCase:
    """One (image, report) row of a manifest."""

    image_id: str
    image: str
    report: str
    metadata: dict


def _first(rec: dict, keys: Sequence[str]) -> tuple[str | None, Any]:
    for k in keys:
        if k in rec and rec[k] is not None and str(rec[k]).strip() != "":
            return k, rec[k]
    return None, None


def _manifest_rows(m: Path) -> list[tuple[int, Any]]:
    suffix = m.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        text = m.read_text(encoding="utf-8")
        if suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = None  # JSON lines in a .json file
            if isinstance(data, list):
                return [(i, r) for i, r in enumerate(data, 1)]
            if isinstance(data, dict):
                if all(isinstance(v, str) for v in data.values()):  # {"case1.png": "report", ...}
                    return [(i, {"image": k, "report": v}) for i, (k, v) in enumerate(data.items(), 1)]
                return [(1, data)]
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ImageIndexError(f"{m}:{i}: not valid JSON ({exc.msg})") from None
        return rows
    if suffix in (".csv", ".tsv"):
        with open(m, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            fields = [c.strip() for c in reader.fieldnames or []]
            if not any(k in fields for k in _IMAGE_KEYS):
                raise ImageIndexError(
                    f"{m}: the header row {fields} has no image column; name it 'image' (or file, filename, path) "
                    "and the report column 'report' (or caption, findings, text)")
            return [(i, {(k or "").strip(): v for k, v in r.items()}) for i, r in enumerate(reader, 2)]
    raise ImageIndexError(f"{m}: a reports file must be .jsonl, .json, .csv or .tsv (got {suffix or 'no suffix'!r})")


def read_image_manifest(manifest: str | Path) -> Iterator[ImageCase]:
    """Read a reports file (JSONL, JSON, CSV or TSV; see the module docstring) into :class:`ImageCase` rows.

    Raises :class:`ImageIndexError` naming the file and line of the first bad row.
    """
    m = Path(manifest).expanduser()
    if not m.is_file():
        raise ImageIndexError(f"reports file {m} does not exist")
    for i, rec in _manifest_rows(m):
        if not isinstance(rec, dict):
            raise ImageIndexError(f"{m}:{i}: each row must be an object with 'image' and 'report', got {rec!r:.60}")
        ikey, image = _first(rec, _IMAGE_KEYS)
        if image is None:
            raise ImageIndexError(f"{m}:{i}: each row needs an 'image' path (relative to the images folder) and a "
                                  "'report'")
        rkey, report = _first(rec, _REPORT_KEYS)
        if report is None:
            raise ImageIndexError(f"{m}:{i}: row for image {image!r} has no 'report' (or 'caption'), or it is empty")
        _, cid = _first(rec, _ID_KEYS)
        meta = {k: v for k, v in rec.items() if k not in (ikey, rkey, *_ID_KEYS)}
        yield ImageCase(str(cid if cid is not None else Path(str(image)).stem), str(image), str(report), meta)


def image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively, by suffix: :data:`IMAGE_SUFFIXES`), sorted."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def unreported_images(images_dir: str | Path, reports: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """Image files under ``images_dir`` that no row of ``reports`` names (those under ``exclude`` aside)."""
    base = Path(images_dir).expanduser()
    listed = {(base / c.image).resolve() for c in read_image_manifest(reports)}
    skip = Path(exclude).expanduser().resolve() if exclude is not None else None
    return [p for p in image_files(base) if p.resolve() not in listed and not (skip and skip in p.resolve().parents)]


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
              encoder: ImageEncoder | str = "pixel-stats", copy_images: bool = True, batch_size: int = 32,
              progress: bool = False) -> Path:
        """Encode every image the reports file lists and write the index directory atomically; returns its path.

        ``images_dir`` is where relative image paths point (default: the reports file's folder). Every
        problem is found before anything is written: a missing folder, rows naming absent images (listed),
        duplicate ids; an image that does not decode is named. ``progress`` shows a progress bar.
        """
        from tqdm.auto import tqdm

        from medrwr.retrieval.image_io import load_image
        from medrwr.retrieval.index.store import atomic_index_dir, write_manifest

        manifest = Path(manifest).expanduser()
        base = Path(images_dir).expanduser() if images_dir is not None else manifest.parent
        cases = list(read_image_manifest(manifest))
        if not base.is_dir():
            raise ImageIndexError(f"images folder {base} does not exist" if not base.exists()
                                  else f"images folder {base} is not a directory")
        if not cases:
            raise ImageIndexError(f"reports file {manifest} has no rows")
        seen: set[str] = set()
        missing: list[str] = []
        for c in cases:
            if c.image_id in seen:
                raise ImageIndexError(f"{manifest}: duplicate image id {c.image_id!r}; give each row a unique 'id'")
            seen.add(c.image_id)
            if not (base / c.image).is_file():
                missing.append(c.image)
        if missing:
            shown = ", ".join(repr(x) for x in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ImageIndexError(f"{manifest}: {len(missing)} report row(s) name images not found in {base}: {shown}")
        enc = load_image_encoder(encoder)
        with atomic_index_dir(out_dir) as tmp:
            items, embs = [], []
            bar = tqdm(total=len(cases), desc="encode images", unit="img", disable=not progress, leave=False)
            for s in range(0, len(cases), batch_size):
                batch = cases[s:s + batch_size]
                datas = [(base / c.image).read_bytes() for c in batch]
                try:
                    embs.append(enc.encode_images([base / c.image for c in batch], batch_size=batch_size))
                except ImageLoadError as exc:
                    bar.close()
                    for c in batch:  # name the image that does not decode
                        try:
                            load_image(base / c.image)
                        except ImageLoadError as one:
                            raise ImageIndexError(f"{one} (row id {c.image_id!r} of {manifest.name}); replace the "
                                                  "file or drop its row") from None
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
                bar.update(len(batch))
            bar.close()
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
    """``<cache>/indexes/demo-images-v1``: where ``cdir.image_index=demo`` (or none, for ``ask --cdir``) builds it."""
    from medrwr.assets import cache_root

    return cache_root() / "indexes" / "demo-images-v1"


def ensure_demo_image_index(encoder: ImageEncoder | str = "pixel-stats") -> Path:
    """The demo image index in the cache, built on first use (seconds); safe under concurrent first use."""
    from filelock import FileLock

    path = default_demo_image_index_path()
    if (path / "manifest.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock")):
        if not (path / "manifest.json").is_file():
            build_demo_image_index(path, encoder=encoder)
    return path


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
    "DEMO_NAME",
    "IMAGE_SUFFIXES",
    "ImageCase",
    "ImageIndex",
    "build_demo_image_index",
    "default_demo_image_index_path",
    "ensure_demo_image_index",
    "image_files",
    "read_image_manifest",
    "unreported_images",
]
