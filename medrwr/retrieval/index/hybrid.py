"""Hybrid retrieval: BM25 + dense fused by reciprocal rank; the default text Retriever.

:func:`build_index` streams documents once into an index directory (see :mod:`medrwr.retrieval.index.store`)
and builds BM25 and, unless ``dense=False``, memory-mapped embeddings and a FAISS index, all inside
an atomic temp directory. :class:`HybridRetriever` loads it and answers batches: one bm25s call and
one encoder + FAISS call per batch, whatever its size.

>>> rrf_fuse([["a", "b"], ["b", "c"]], k=60)[0][0]
'b'
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from medrwr.config import RetrievalConfig
from medrwr.retrieval.base import SEARCH_MODES, Hit, check_search_args
from medrwr.retrieval.index.corpus import Document, chunk_documents
from medrwr.retrieval.index.store import (
    DOCS_FILE,
    RESERVED_KEYS,
    DocStore,
    DocStoreWriter,
    IndexCorrupt,
    IndexStoreError,
    atomic_index_dir,
    load_manifest,
    write_manifest,
)

logger = logging.getLogger(__name__)

BM25_DIR = "bm25"
EMBEDDINGS_FILE = "embeddings.npy"

K = TypeVar("K", bound=Hashable)


def rrf_fuse(
    rankings: Sequence[Sequence[K]], weights: Sequence[float] | None = None, k: int = 60
) -> list[tuple[K, float]]:
    """Reciprocal-rank fusion: ``score(d) = sum_i w_i / (k + rank_i(d))``, ranks from 1, best first.

    An item repeated inside one ranking counts at its best rank only. Ties keep the order of first
    appearance (rankings in order, each best first).

    >>> [(d, round(s, 4)) for d, s in rrf_fuse([["x", "y"], ["y"]], weights=[1.0, 2.0], k=1)]
    [('y', 1.3333), ('x', 0.5)]
    """
    if weights is None:
        weights = [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError(f"rrf_fuse got {len(rankings)} rankings but {len(weights)} weights")
    if k < 0:
        raise ValueError(f"rrf k must be >= 0, got {k}")
    scores: dict[K, float] = {}
    for ranking, w in zip(rankings, weights):
        seen: set = set()
        for rank, item in enumerate(ranking, 1):
            if item in seen:
                continue
            seen.add(item)
            scores[item] = scores.get(item, 0.0) + w / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def _index_text(d: dict[str, Any]) -> str:
    """The text BM25 and the encoder see for a stored document: title, newline, text."""
    title, text = d.get("title") or "", d.get("text") or ""
    return f"{title}\n{text}" if title else text


def _dedup_key(text: str) -> str:
    return " ".join(text.split()).casefold()


def _config_from_manifest(manifest: dict[str, Any]) -> RetrievalConfig:
    saved = manifest.get("build_config") or {}
    names = {f.name for f in dataclasses.fields(RetrievalConfig)}
    try:
        return RetrievalConfig(**{k: v for k, v in saved.items() if k in names})
    except (TypeError, ValueError):
        logger.warning(
            "index build_config is not a valid RetrievalConfig; using defaults for search settings"
        )
        return RetrievalConfig()


class HybridRetriever:
    """Batched BM25 / dense / hybrid search over an index directory built by :func:`build_index`.

    Use :meth:`load`. The text encoder is loaded on the first dense or hybrid query (or by
    :meth:`warmup`), so BM25-only use never imports torch. Thread-safe for concurrent ``search``.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        docs: DocStore,
        bm25: Any,
        dense: Any | None,
        encoder: Any | None,
        config: RetrievalConfig,
    ):
        self.path = path
        self.manifest = manifest
        self.docs = docs
        self.bm25 = bm25
        self.dense = dense
        self._encoder = encoder
        self.config = config
        self._lock = threading.Lock()
        self.modes: tuple[str, ...] = SEARCH_MODES if dense is not None else ("bm25",)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        encoder: Any | None = None,
        config: RetrievalConfig | None = None,
        verify: bool | str = True,
    ) -> HybridRetriever:
        """Open an index directory: verify its manifest and checksums, map BM25, docs and FAISS.

        ``config`` sets search behaviour (mode, k, rrf_k, weights, fusion_depth, n_threads, nprobe);
        by default the config the index was built with. ``encoder`` overrides the one recorded in
        the manifest (its ``dim`` must match).
        """
        from medrwr.retrieval.index.bm25 import BM25Index

        t0 = time.perf_counter()
        p = Path(path).expanduser()
        manifest = load_manifest(p, verify=verify)  # type: ignore[arg-type]
        cfg = config or _config_from_manifest(manifest)
        n = manifest.get("doc_count")
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
                f"index {p} cannot be opened ({type(exc).__name__}: {exc}); "
                "rebuild it with `medrwr index build --corpus PATH --out DIR`"
            ) from None
        counts = {"manifest": n, "docs": len(docs), "bm25": bm25.n_docs}
        if dense is not None:
            counts["faiss"] = dense.ntotal
        if len(set(counts.values())) != 1:
            raise IndexCorrupt(f"index {p} is inconsistent: document counts differ {counts}; rebuild it")
        enc_info = manifest.get("encoder") or {}
        if encoder is not None and dense is not None and int(encoder.dim) != int(dense.dim):
            raise IndexStoreError(
                f"encoder {getattr(encoder, 'name', encoder)!r} has dim {encoder.dim} but index {p} was "
                f"built with {enc_info.get('name')!r} (dim {dense.dim}); pass a matching encoder or rebuild"
            )
        if encoder is not None and enc_info and getattr(encoder, "name", None) != enc_info.get("name"):
            logger.warning(
                "index %s was built with encoder %r; searching with %r", p, enc_info.get("name"), encoder.name
            )
        self = cls(p, manifest, docs, bm25, dense, encoder, cfg)
        logger.info(
            "loaded index %s (%d docs, modes %s) in %.2fs", p, len(docs), self.modes, time.perf_counter() - t0
        )
        return self

    @property
    def doc_count(self) -> int:
        return len(self.docs)

    @property
    def encoder(self) -> Any:
        """The query encoder, loaded on first use from the manifest's spec."""
        if self._encoder is None:
            if self.dense is None:
                raise ValueError(f"index {self.path} has no dense part; only mode 'bm25' is available")
            from medrwr.retrieval.encoders.text import load_index_encoder

            with self._lock:
                if self._encoder is None:
                    self._encoder = load_index_encoder(
                        self.manifest.get("encoder"), self.config, self.dense.dim, f"index {self.path}"
                    )
        return self._encoder

    def warmup(self) -> None:
        """Load the encoder and run one query through every available mode."""
        for mode in self.modes:
            self.search(["warmup"], k=1, mode=mode)

    def close(self) -> None:
        self.docs.close()

    # ------------------------------------------------------------------ search

    def _check_mode(self, mode: str | None) -> str:
        mode = mode or self.config.mode
        if mode not in SEARCH_MODES:
            raise ValueError(f"unknown retrieval mode {mode!r}; choose one of {', '.join(SEARCH_MODES)}")
        if mode not in self.modes:
            raise ValueError(
                f"mode {mode!r} needs dense embeddings but index {self.path} was built without them "
                f"(dense=False); use mode='bm25' or rebuild with dense enabled"
            )
        return mode

    def _bm25_rankings(self, queries: Sequence[str], depth: int) -> list[tuple[np.ndarray, np.ndarray]]:
        ids, scores = self.bm25.search(queries, depth)
        return [(ids[i][scores[i] > 0], scores[i][scores[i] > 0]) for i in range(len(queries))]

    def _dense_rankings(self, queries: Sequence[str], depth: int) -> list[tuple[np.ndarray, np.ndarray]]:
        from medrwr.retrieval.encoders.text import encode_queries

        qv = encode_queries(self.encoder, queries, batch_size=self.config.batch_size)
        scores, ids = self.dense.search(qv, depth)
        return [(ids[i][ids[i] >= 0], scores[i][ids[i] >= 0]) for i in range(len(queries))]

    def search(self, queries: Sequence[str], k: int = 3, mode: str | None = None) -> list[list[Hit]]:
        """Top-``k`` hits per query, best first, de-duplicated by doc_id and by identical text.

        ``mode``: ``bm25``, ``dense`` or ``hybrid`` (RRF of both); None = the config's mode.
        Scores are BM25 scores, cosine similarities, or RRF scores respectively.
        """
        queries = check_search_args(queries, k)
        mode = self._check_mode(mode)
        if not queries:
            return []
        n = self.doc_count
        depth = min(n, max(int(self.config.fusion_depth), int(k)))
        if mode == "bm25":
            per_query = [list(zip(r.tolist(), s.tolist())) for r, s in self._bm25_rankings(queries, depth)]
        elif mode == "dense":
            per_query = [list(zip(r.tolist(), s.tolist())) for r, s in self._dense_rankings(queries, depth)]
        else:
            sparse = self._bm25_rankings(queries, depth)
            dense = self._dense_rankings(queries, depth)
            weights = [self.config.bm25_weight, self.config.dense_weight]
            per_query = [
                rrf_fuse([sparse[i][0].tolist(), dense[i][0].tolist()], weights, self.config.rrf_k)
                for i in range(len(queries))
            ]
        return [self._hits(ranked, int(k)) for ranked in per_query]

    def _hits(self, ranked: list[tuple[int, float]], k: int) -> list[Hit]:
        hits: list[Hit] = []
        seen_ids: set[str] = set()
        seen_text: set[str] = set()
        for row, score in ranked:
            d = self.docs.raw(int(row))
            doc_id, text = str(d["doc_id"]), d.get("text") or ""
            key = _dedup_key(text)
            if doc_id in seen_ids or (key and key in seen_text):
                continue
            seen_ids.add(doc_id)
            seen_text.add(key)
            hits.append(
                Hit(
                    doc_id=doc_id,
                    text=text,
                    title=d.get("title") or "",
                    score=float(score),
                    source=d.get("source") or "",
                )
            )
            if len(hits) == k:
                break
        return hits

    def get_document(self, row: int) -> Document:
        return self.docs.get(row)

    def __repr__(self) -> str:
        return f"HybridRetriever({str(self.path)!r}, docs={self.doc_count}, modes={self.modes})"


# ------------------------------------------------------------------------------------------ building


def build_index(
    documents: Iterable[Document],
    out_dir: str | os.PathLike,
    config: RetrievalConfig | None = None,
    encoder: Any | str | None = None,
    dense: bool = True,
    extra_manifest: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> Path:
    """Build an index directory at ``out_dir`` (atomically; a failure leaves any previous index intact).

    Streams ``documents`` once into the doc store (chunked when ``config.chunk_words`` > 0), then
    builds BM25 from the store and, when ``dense`` and ``config.dense``, encodes passages into a
    memory-mapped ``embeddings.npy`` and a FAISS index. ``encoder`` is a :class:`TextEncoder`, a
    spec for :func:`~medrwr.retrieval.encoders.text.load_text_encoder`, or None for ``config.encoder``.
    ``extra_manifest`` (e.g. attribution) is merged into ``manifest.json``.
    """
    from tqdm.auto import tqdm

    from medrwr.retrieval.index.bm25 import BM25Index

    cfg = config or RetrievalConfig()
    use_dense = bool(dense and cfg.dense)
    extra = dict(extra_manifest or {})
    clash = RESERVED_KEYS & extra.keys()
    if clash:
        raise ValueError(f"extra_manifest cannot set reserved keys {sorted(clash)}")
    t0 = time.perf_counter()
    if cfg.chunk_words:
        documents = chunk_documents(documents, cfg.chunk_words, cfg.chunk_overlap)
    out = Path(out_dir).expanduser().absolute()
    with atomic_index_dir(out) as tmp:
        writer = DocStoreWriter(tmp)
        try:
            for doc in tqdm(documents, desc="read documents", unit="doc", disable=not show_progress):
                if not isinstance(doc, Document):
                    raise TypeError(f"build_index needs Document objects, got {type(doc).__name__}")
                writer.add(doc)
        finally:
            writer.close()
        n = len(writer)
        if n == 0:
            raise ValueError("the corpus has no documents; nothing to index")
        store = DocStore(tmp)
        try:
            bm25 = BM25Index(
                k1=cfg.bm25_k1,
                b=cfg.bm25_b,
                method=cfg.bm25_method,
                stemmer=cfg.stemmer,
                stopwords=cfg.stopwords,
            )
            bm25.index(
                tqdm(
                    store.iter_texts(_index_text),
                    total=n,
                    desc="bm25 tokenize",
                    unit="doc",
                    disable=not show_progress,
                ),
            )
            bm25.save(tmp / BM25_DIR)
            enc_info = dense_info = None
            if use_dense:
                enc_info, dense_info = _build_dense(store, tmp, cfg, encoder, show_progress)
        finally:
            store.close()
        manifest: dict[str, Any] = {
            "kind": "medrwr-text-index",
            "doc_count": n,
            "corpus": {"sha256": writer.corpus_sha256, "sources": writer.sources},
            "modes": list(SEARCH_MODES if use_dense else ("bm25",)),
            "bm25": {
                "k1": cfg.bm25_k1,
                "b": cfg.bm25_b,
                "method": cfg.bm25_method,
                "stemmer": cfg.stemmer,
                "stopwords": cfg.stopwords,
            },
            "encoder": enc_info,
            "dense": dense_info,
            "build_config": dataclasses.asdict(cfg),
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        manifest.update(extra)
        write_manifest(tmp, manifest, known_sha256={DOCS_FILE: writer.corpus_sha256})
    logger.info("built index %s: %d documents in %.1fs", out, n, time.perf_counter() - t0)
    return out


def _build_dense(
    store: DocStore, tmp: Path, cfg: RetrievalConfig, encoder: Any | str | None, show_progress: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    from medrwr.retrieval.encoders.text import encode_to_memmap, encoder_spec, load_text_encoder
    from medrwr.retrieval.index.dense import DenseIndex

    if encoder is None or isinstance(encoder, str):
        encoder = load_text_encoder(
            encoder or cfg.encoder,
            device=cfg.device,
            query_prefix=cfg.query_prefix,
            passage_prefix=cfg.passage_prefix,
            max_seq_length=cfg.max_seq_length,
        )
    n = len(store)
    emb = encode_to_memmap(
        encoder, store.iter_texts(_index_text), n, tmp / EMBEDDINGS_FILE, cfg.batch_size, show_progress
    )
    dim = int(emb.shape[1])
    del emb
    index = DenseIndex(
        dim,
        cfg.faiss_index,
        nlist=cfg.ivf_nlist,
        m=cfg.hnsw_m,
        nprobe=cfg.ivf_nprobe,
        ef_search=cfg.hnsw_ef_search,
    )
    index.build(tmp / EMBEDDINGS_FILE, show_progress=show_progress)
    index.save(tmp)
    enc_info = {
        "spec": encoder_spec(encoder),
        "name": getattr(encoder, "name", encoder_spec(encoder)),
        "dim": dim,
        "query_prefix": getattr(encoder, "query_prefix", None) or None,
        "passage_prefix": getattr(encoder, "passage_prefix", None) or None,
        "max_seq_length": cfg.max_seq_length,
    }
    dense_info = {
        "faiss_index": index.kind,
        "nlist": index.nlist if index.kind == "ivf" else None,
        "hnsw_m": index.m if index.kind == "hnsw" else None,
        "ntotal": index.ntotal,
        "metric": "inner_product",
        "normalized": True,
    }
    return enc_info, dense_info


__all__ = ["HybridRetriever", "build_index", "rrf_fuse"]
