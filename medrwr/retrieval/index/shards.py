"""Shards: an index split into document ranges whose scores stay those of the whole index.

Why exact: a shard built from its own documents would have its own BM25 statistics (IDF, average
length), so its scores could not be compared with another shard's. :func:`split_index` instead
*slices* the built index: each shard keeps the global BM25 score matrix's columns for its rows
(scores computed with whole-corpus statistics) and its rows of the embedding matrix. Every shard's
BM25 and inner-product scores are then the unsharded index's scores, and merging per-shard top-D
lists by score (:func:`merge_rankings`) gives the unsharded top-D. Exact for ``flat`` FAISS
indexes; ``ivf``/``hnsw`` shards are re-trained per shard (approximate).

An ordinary index is a single shard (row offset 0): :class:`IndexShard` is what opens an index
directory, and :class:`~medrwr.retrieval.index.hybrid.HybridRetriever` routes every search over one
or more of them. A *shard set* is what the router talks to: ``len(shards)``,
``shards.submit(i, method, *args)`` returning an object with ``.result()`` (a Future, or a Ray Serve
response), and ``shards.close()``. :class:`LocalShards` is the in-process one; Ray Serve handles
are the remote one (:mod:`medrwr.retrieval.service.ray`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from medrwr.config import RetrievalConfig
from medrwr.errors import IndexCorrupt, IndexStoreError
from medrwr.retrieval.base import SEARCH_MODES
from medrwr.retrieval.index.store import (
    DOCS_FILE,
    RESERVED_KEYS,
    DocStore,
    DocStoreWriter,
    atomic_index_dir,
    load_manifest,
    rebuild_advice,
    write_manifest,
)

logger = logging.getLogger(__name__)

BM25_DIR = "bm25"
EMBEDDINGS_FILE = "embeddings.npy"

# ------------------------------------------------------------------------------------------ splitting


_BM25_ARRAYS = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy")


# ------------------------------------------------------------------------------------------ splitting


def shard_bounds(n_docs: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal row ranges ``[(lo, hi), ...]`` covering ``range(n_docs)``.

    >>> shard_bounds(10, 3)
    [(0, 3), (3, 6), (6, 10)]
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    if n_shards > n_docs:
        raise ValueError(f"cannot split {n_docs} documents into {n_shards} shards; use at most {n_docs}")
    edges = np.linspace(0, n_docs, n_shards + 1).astype(np.int64)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(n_shards)]


def _slice_bm25(src: Path, dst: Path, lo: int, hi: int) -> None:
    """Write the bm25s index restricted to rows [lo, hi), keeping the global per-token scores."""
    dst.mkdir(parents=True, exist_ok=True)
    data = np.load(src / _BM25_ARRAYS[0], allow_pickle=False)
    indices = np.load(src / _BM25_ARRAYS[1], allow_pickle=False)
    indptr = np.load(src / _BM25_ARRAYS[2], allow_pickle=False)
    n_tokens = len(indptr) - 1
    keep = (indices >= lo) & (indices < hi)
    token_of_entry = np.repeat(np.arange(n_tokens, dtype=np.int64), np.diff(indptr))
    counts = np.bincount(token_of_entry[keep], minlength=n_tokens)
    new_indptr = np.zeros(n_tokens + 1, dtype=indptr.dtype)
    np.cumsum(counts, out=new_indptr[1:])
    np.save(dst / _BM25_ARRAYS[0], data[keep], allow_pickle=False)
    np.save(dst / _BM25_ARRAYS[1], (indices[keep] - lo).astype(indices.dtype), allow_pickle=False)
    np.save(dst / _BM25_ARRAYS[2], new_indptr, allow_pickle=False)
    for f in src.iterdir():
        if f.name in _BM25_ARRAYS or not f.is_file():
            continue
        if f.suffix == ".json":
            params = json.loads(f.read_text(encoding="utf-8"))
            for key in ("num_docs", "n_docs"):
                if key in params:
                    params[key] = hi - lo
            (dst / f.name).write_text(json.dumps(params, indent=2), encoding="utf-8")
        else:  # e.g. bm25l/bm25+'s non-occurrence scores: per token, global, copied as they are
            shutil.copy2(f, dst / f.name)


def split_index(
    index_dir: str | os.PathLike, out_dir: str | os.PathLike, n_shards: int, show_progress: bool = True
) -> list[Path]:
    """Split a built index into ``n_shards`` document-range shard indexes under ``out_dir``.

    Each shard directory is written atomically and loads with ``HybridRetriever.load``; its
    manifest's ``shard`` section records ``row_offset``, ``rows`` and the parent index. Existing
    shards of the same parent (same corpus hash and doc count) are reused.
    """
    from tqdm.auto import tqdm

    from medrwr.retrieval.index.dense import DenseIndex

    src = Path(index_dir).expanduser().absolute()
    parent = load_manifest(src, verify=True)
    n = int(parent["doc_count"])
    bounds = shard_bounds(n, n_shards)
    out = Path(out_dir).expanduser().absolute()
    parent_info = {"path": str(src), "doc_count": n, "corpus_sha256": (parent.get("corpus") or {}).get("sha256")}
    dense_info = parent.get("dense") or None
    if dense_info and dense_info.get("faiss_index", "flat") != "flat":
        logger.warning(
            "index %s uses a %s FAISS index: each shard re-trains its own, so sharded dense results are "
            "approximate (flat indexes shard exactly)", src, dense_info.get("faiss_index")
        )
    parent_dense = DenseIndex.load(src) if dense_info else None  # read once: only its parameters are reused
    paths = []
    store = DocStore(src)
    try:
        for i, (lo, hi) in enumerate(tqdm(bounds, desc="write shards", unit="shard", disable=not show_progress)):
            path = out / f"shard-{i:03d}-of-{n_shards:03d}"
            paths.append(path)
            if _is_shard_of(path, parent_info, lo, hi):
                continue
            with atomic_index_dir(path) as tmp:
                writer = DocStoreWriter(tmp)
                try:
                    for row in range(lo, hi):
                        writer.add(store.get(row))
                finally:
                    writer.close()
                _slice_bm25(src / BM25_DIR, tmp / BM25_DIR, lo, hi)
                manifest = {k: v for k, v in parent.items() if k not in RESERVED_KEYS}
                manifest["doc_count"] = hi - lo
                manifest["corpus"] = {"sha256": writer.corpus_sha256, "sources": writer.sources}
                if parent_dense is not None:
                    emb = np.load(src / EMBEDDINGS_FILE, mmap_mode="r", allow_pickle=False)[lo:hi]
                    np.save(tmp / EMBEDDINGS_FILE, np.ascontiguousarray(emb, dtype=np.float32), allow_pickle=False)
                    index = DenseIndex(
                        parent_dense.dim, parent_dense.kind, nlist=parent_dense.nlist, m=parent_dense.m,
                        nprobe=parent_dense.nprobe, ef_search=parent_dense.ef_search,
                    )
                    index.build(tmp / EMBEDDINGS_FILE)
                    index.save(tmp)
                    manifest["dense"] = {**dense_info, "ntotal": index.ntotal}
                manifest["shard"] = {"index": i, "count": n_shards, "row_offset": lo, "rows": [lo, hi],
                                     "parent": parent_info}
                write_manifest(tmp, manifest, known_sha256={DOCS_FILE: writer.corpus_sha256})
    finally:
        store.close()
    logger.info("split %s (%d docs) into %d shards under %s", src, n, n_shards, out)
    return paths


def _is_shard_of(path: Path, parent: dict[str, Any], lo: int, hi: int) -> bool:
    try:
        m = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    shard = m.get("shard") or {}
    return shard.get("rows") == [lo, hi] and shard.get("parent", {}).get("corpus_sha256") == parent["corpus_sha256"] \
        and shard.get("parent", {}).get("doc_count") == parent["doc_count"]


# ------------------------------------------------------------------------------------------ one shard


class IndexShard:
    """One index directory's BM25 + FAISS search and documents, in global row ids. Holds no text encoder.

    Use :meth:`load`. ``rankings`` returns, per mode and per query, ``(rows, scores)`` best first:
    BM25 keeps positive scores only and dense drops FAISS's -1 padding. The router encodes each
    batch once and sends the query vectors.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], docs: DocStore, bm25: Any, dense: Any | None):
        self.path = path
        self.manifest = manifest
        self.docs = docs
        self.bm25 = bm25
        self.dense = dense
        self.row_offset = int((manifest.get("shard") or {}).get("row_offset", 0))
        self.doc_count = len(docs)
        self.modes: tuple[str, ...] = SEARCH_MODES if dense is not None else ("bm25",)

    @classmethod
    def load(cls, path: str | os.PathLike, config: RetrievalConfig | None = None, verify: bool | str = True) -> IndexShard:
        """Open an index directory: verify its manifest and checksums, map BM25, docs and FAISS.

        ``config`` gives the search-time engine settings (n_threads, ivf_nprobe, hnsw_ef_search);
        by default those the index was built with.
        """
        from medrwr.retrieval.index.bm25 import BM25Index

        p = Path(path).expanduser()
        manifest = load_manifest(p, verify=verify)  # type: ignore[arg-type]
        cfg = config or RetrievalConfig.from_stored(manifest.get("build_config"))
        try:
            docs = DocStore(p)
            bm25 = BM25Index.load(p / BM25_DIR, n_threads=cfg.n_threads)
            dense = None
            if manifest.get("dense"):
                from medrwr.retrieval.index.dense import DenseIndex

                dense = DenseIndex.load(p, nprobe=cfg.ivf_nprobe, ef_search=cfg.hnsw_ef_search)
                dense.threads = cfg.n_threads
        except IndexStoreError:
            raise
        except Exception as exc:
            raise IndexCorrupt(
                f"index {p} cannot be opened ({type(exc).__name__}: {exc}); {rebuild_advice(p, manifest)}"
            ) from None
        counts = {"manifest": manifest.get("doc_count"), "docs": len(docs), "bm25": bm25.n_docs}
        if dense is not None:
            counts["faiss"] = dense.ntotal
        if len(set(counts.values())) != 1:
            docs.close()
            raise IndexCorrupt(f"index {p} is inconsistent: document counts differ {counts}; rebuild it")
        return cls(p, manifest, docs, bm25, dense)

    def info(self) -> dict[str, Any]:
        """What the router needs to know about this shard (JSON-able, so it crosses Ray too)."""
        m = self.manifest
        return {
            "path": str(self.path),
            "rows": [self.row_offset, self.row_offset + self.doc_count],
            "doc_count": self.doc_count,
            "modes": list(self.modes),
            "encoder": m.get("encoder"),
            "build_config": m.get("build_config"),
            "parent": (m.get("shard") or {}).get("parent"),
        }

    def rankings(
        self, queries: Sequence[str], depth: int, modes: Sequence[str], query_vectors: np.ndarray | None = None
    ) -> dict[str, list[tuple[list[int], list[float]]]]:
        out: dict[str, list[tuple[list[int], list[float]]]] = {}
        off = self.row_offset
        if "bm25" in modes:
            ids, scores = self.bm25.search(list(queries), depth)
            out["bm25"] = [((ids[i][scores[i] > 0] + off).tolist(), scores[i][scores[i] > 0].tolist())
                           for i in range(len(queries))]
        if "dense" in modes:
            if self.dense is None:
                raise ValueError(f"index {self.path} has no dense part; only mode 'bm25' is available")
            if query_vectors is None:
                raise ValueError("dense rankings need the query vectors (the router encodes them)")
            scores, ids = self.dense.search(np.asarray(query_vectors, dtype=np.float32), depth)
            out["dense"] = [((ids[i][ids[i] >= 0] + off).tolist(), scores[i][ids[i] >= 0].tolist())
                            for i in range(len(queries))]
        return out

    def documents(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        """Stored documents for global ``rows`` (all in this shard)."""
        off = self.row_offset
        return [self.docs.raw(int(r) - off) for r in rows]

    def close(self) -> None:
        self.docs.close()


# ------------------------------------------------------------------------------------------ merging


def merge_rankings(
    per_shard: Sequence[list[tuple[list[int], list[float]]]], depth: int, later_shards_first: bool = False
) -> list[tuple[list[int], list[float]]]:
    """Per query, the global top-``depth`` of all shards' lists (given in row order) by score.

    Exact ties keep each shard's own order; across shards the earlier shard (lower rows) comes first,
    or the later one with ``later_shards_first``. That reproduces the unsharded engines: bm25s puts
    tied rows in ascending order, FAISS in descending order (see :data:`_LATER_FIRST`).
    """
    n_queries = len(per_shard[0]) if per_shard else 0
    parts = list(reversed(per_shard)) if later_shards_first else list(per_shard)
    merged = []
    for q in range(n_queries):
        rows = np.concatenate([np.asarray(s[q][0], dtype=np.int64) for s in parts])
        scores = np.concatenate([np.asarray(s[q][1], dtype=np.float64) for s in parts])
        order = np.argsort(-scores, kind="stable")[:depth]
        merged.append((rows[order].tolist(), scores[order].tolist()))
    return merged


_LATER_FIRST = {"bm25": False, "dense": True}
"""Tie order per mode, as the unsharded engines give it (bm25s: ascending rows; FAISS: descending)."""


class _Done:
    """A result already computed, with the ``.result()`` of a Future (one shard is called inline)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def result(self) -> Any:
        return self.value


class LocalShards:
    """In-process shards. One shard is called inline; several from a small thread pool (FAISS and
    bm25s release the GIL)."""

    def __init__(self, shards: Sequence[IndexShard]):
        self.shards = list(shards)
        self._pool = None
        if len(self.shards) > 1:
            self._pool = ThreadPoolExecutor(max_workers=len(self.shards), thread_name_prefix="medrwr-shard")

    def __len__(self) -> int:
        return len(self.shards)

    def submit(self, i: int, method: str, *args: Any) -> Future | _Done:
        fn = getattr(self.shards[i], method)
        if self._pool is None:
            return _Done(fn(*args))
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        for shard in self.shards:
            shard.close()


__all__ = ["IndexShard", "LocalShards", "merge_rankings", "shard_bounds", "split_index"]
