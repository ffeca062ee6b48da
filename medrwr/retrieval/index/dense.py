"""Dense index: FAISS ``flat`` / ``ivf`` / ``hnsw`` over L2-normalised vectors, inner product (= cosine).

Saved with FAISS's own format (never pickle); thread count set per search call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


__all__ = ["FAISS_KINDS", "DenseIndex", "faiss_threads"]
