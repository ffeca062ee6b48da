"""Hybrid retrieval: BM25 + dense (+ exact names) fused by weighted reciprocal rank; the text Retriever.

Long module: the router, its builder and the fusion share the index layout and the name table, and
splitting them would scatter one search path over several files.

:func:`build_index` streams documents once into an index directory (see :mod:`medrwr.retrieval.index.store`)
and builds BM25 and, unless ``dense=False``, memory-mapped embeddings and a FAISS index, all inside
an atomic temp directory. :class:`HybridRetriever` routes batches over the index's shards (an
ordinary index is one shard): one bm25s call and one encoder + FAISS call per batch and shard.
Documents whose ``metadata["names"]`` list their names (the default KB's concept names and synonyms)
also get a name table: exact names (``names.npz``) and BM25 over the names alone (``bm25_names/``, where
a short name is not drowned by a long passage). In hybrid mode they add two rankings, weighted by
``retrieval.name_weight`` (exact matches) and ``retrieval.name_bm25_weight``, so typing a concept's name,
or most of one of its lay names, finds that concept. Documents with ``metadata["clinical"]`` (the default KB's
clinical presentations) get BM25 over that text alone (``bm25_clinical/``): a ranking weighted by
``retrieval.clinical_weight``, so a description of a patient meets the presentation it resembles without
competing with 65k dictionary passages. With a dense encoder, the names are also embedded one by one
(``names_dense.faiss``, 8-bit scalar-quantised, with ``names_dense_rows.npy``): a ranking of documents by
their closest name to the query (``retrieval.name_dense_weight``), so "seeing double" meets "Double
vision" without sharing a word. The name table serves unsharded local indexes.

>>> rrf_fuse([["a", "b"], ["b", "c"]], k=60)[0][0]
'b'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from medrwr.config import RetrievalConfig
from medrwr.errors import IndexStoreError
from medrwr.retrieval.base import (
    SEARCH_MODES,
    Hit,
    Retriever,
    check_mode,
    check_search_args,
    pick_default_mode,
)
from medrwr.retrieval.index.corpus import Document, chunk_documents
from medrwr.retrieval.index.shards import (
    _LATER_FIRST,
    BM25_DIR,
    EMBEDDINGS_FILE,
    IndexShard,
    LocalShards,
    merge_rankings,
)
from medrwr.retrieval.index.store import (
    DOCS_FILE,
    RESERVED_KEYS,
    DocStore,
    DocStoreWriter,
    atomic_index_dir,
    write_manifest,
)

logger = logging.getLogger(__name__)

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


NAMES_FILE = "names.npz"
NAMES_BM25_DIR = "bm25_names"
CLINICAL_BM25_DIR = "bm25_clinical"
NAMES_DENSE_FILE = "names_dense.faiss"
NAMES_DENSE_ROWS = "names_dense_rows.npy"
_FIELD_KEYS = frozenset({"names", "clinical"})
"""Document metadata indexed on its own (name table, name BM25, clinical BM25) and not stored per document."""
_MAX_ROWS_PER_NAME = 20


def name_norm(name: str) -> str:
    """The form the exact-name table keys on: case, punctuation and word order do not matter.

    >>> name_norm("Arthritis, Rheumatoid") == name_norm("rheumatoid arthritis")
    True
    """
    return " ".join(sorted(re.findall(r"[0-9a-z]+", name.casefold())))


def _name_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


def _write_names(path: Path, names: dict[str, list[int]]) -> None:
    pairs = sorted((_name_hash(k), r) for k, rows in names.items() for r in rows[:_MAX_ROWS_PER_NAME])
    np.savez(path, keys=np.asarray([h for h, _ in pairs], dtype=np.int64),
             rows=np.asarray([r for _, r in pairs], dtype=np.int64))


def _new_bm25(cfg: RetrievalConfig) -> Any:
    """An empty BM25 index with the configured parameters (passages, names and clinical text alike)."""
    from medrwr.retrieval.index.bm25 import BM25Index

    return BM25Index(k1=cfg.bm25_k1, b=cfg.bm25_b, method=cfg.bm25_method, stemmer=cfg.stemmer,
                     stopwords=cfg.stopwords)


def _load_field_bm25(path: Path, cfg: RetrievalConfig) -> Any:
    """The BM25 over one field (names, clinical text) saved at ``path``, or None when the index has none."""
    if not path.is_dir():
        return None
    from medrwr.retrieval.index.bm25 import BM25Index

    return BM25Index.load(path, n_threads=cfg.n_threads)


def _first_ranks(rows: Sequence[int]) -> dict[int, int]:
    """Row -> its 1-based rank in one ranking (the first place it appears)."""
    return {r: i + 1 for i, r in reversed(list(enumerate(rows)))}


def _field_ranking(index: Any, queries: Sequence[str], depth: int) -> list[list[int]]:
    """Rows ranked by a BM25 over one field (names, clinical text); rows that match nothing are left out."""
    if index is None:
        return [[] for _ in queries]
    ids, scores = index.search(list(queries), min(depth, index.n_docs))
    return [ids[i][scores[i] > 0].tolist() for i in range(len(queries))]


def _name_dense_ranking(index: Any, rows: np.ndarray, vectors: np.ndarray, depth: int) -> list[list[int]]:
    """Documents ranked by their closest name (inner product with the query vector), ``depth`` at most."""
    k = min(int(index.ntotal), 8 * depth)
    _, nn = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
    out = []
    for hits in nn:
        seen: dict[int, None] = {}
        for r in rows[hits[hits >= 0]].tolist():
            if r not in seen:
                seen[r] = None
                if len(seen) == depth:
                    break
        out.append(list(seen))
    return out


def _index_text(d: dict[str, Any]) -> str:
    """The text BM25 and the encoder see for a stored document: title, newline, text.

    A document whose ``metadata["search_chars"]`` is n is searched by its first n characters only: the
    rest is for the reader (the default KB's "a frequent feature of ..." lists, which would otherwise
    pull a phenotype's passage towards every disease it names).
    """
    title, text = d.get("title") or "", d.get("text") or ""
    cut = (d.get("metadata") or {}).get("search_chars")
    if isinstance(cut, int) and cut >= 0:
        text = text[:cut]
    return f"{title}\n{text}" if title else text


def _dedup_key(text: str) -> str:
    return " ".join(text.split()).casefold()


class HybridRetriever(Retriever):
    """Batched BM25 / dense / hybrid search: the router over one or more :class:`IndexShard`.

    An ordinary index is one local shard (:meth:`load`); a split index is N local shards
    (:meth:`from_shard_dirs`) or N Ray Serve shard deployments (:mod:`medrwr.retrieval.service.ray`).
    The search is the same code for all of them: encode the batch once, ask every shard for its
    per-mode top-D (D = max(fusion_depth, k)), merge by score (one shard: nothing to merge), fuse by
    RRF for hybrid, fetch the documents and de-duplicate. So sharded results equal unsharded ones by
    construction. The text encoder is loaded on the first dense or hybrid query (or by
    :meth:`warmup`), so BM25-only use never imports torch. Thread-safe for concurrent ``search``.
    """

    def __init__(
        self,
        shards: Any,
        infos: Sequence[dict[str, Any]],
        config: RetrievalConfig | None = None,
        encoder: Any | None = None,
        path: Path | None = None,
        manifest: dict[str, Any] | None = None,
    ):
        if not infos:
            raise ValueError("a retriever needs at least one shard")
        self.infos = sorted(infos, key=lambda s: s["rows"][0])
        if [s["rows"][0] for s in self.infos] != [s["rows"][0] for s in infos]:
            raise ValueError("shards must be given in row order")
        for a, b in zip(self.infos, self.infos[1:]):
            if a["rows"][1] != b["rows"][0]:
                raise ValueError(f"shard row ranges are not contiguous: {a['rows']} then {b['rows']}")
        if len({json.dumps(s.get("parent"), sort_keys=True) for s in self.infos}) > 1:
            raise ValueError("the shards come from different parent indexes; split one index with split_index")
        first = self.infos[0]
        self._shards = shards
        self.config = config or RetrievalConfig.from_stored(first.get("build_config"))
        self._modes: tuple[str, ...] = tuple(m for m in SEARCH_MODES if all(m in s["modes"] for s in self.infos))
        self._doc_count = int(self.infos[-1]["rows"][1] - first["rows"][0])
        self.path = path
        self.manifest = manifest if manifest is not None else {
            "encoder": first.get("encoder"), "shards": len(self.infos), "doc_count": self._doc_count}
        self._default_mode = pick_default_mode(self.config.mode, self._modes)
        if self._default_mode != self.config.mode:  # a user's choice is worth a warning; a default is not
            (logger.warning if "mode" in self.config.explicit_keys() else logger.info)("retrieval mode %r is not available for %s (%s); searching with %r by default",
                           self.config.mode, self._where(), ", ".join(self._modes), self._default_mode)
        self._starts = np.asarray([s["rows"][0] for s in self.infos], dtype=np.int64)
        self._local = shards.shards if isinstance(shards, LocalShards) else None
        self._encoder = encoder
        self._lock = threading.Lock()
        self._names: tuple[np.ndarray, np.ndarray] | None = None
        self._names_bm25 = self._clinical_bm25 = None
        self._names_dense: tuple[Any, np.ndarray] | None = None  # loaded on first use (tens of MB)
        self._names_dense_file: Path | None = None
        if path is not None:
            if (Path(path) / NAMES_DENSE_FILE).is_file():
                self._names_dense_file = Path(path) / NAMES_DENSE_FILE
            self._clinical_bm25 = _load_field_bm25(Path(path) / CLINICAL_BM25_DIR, self.config)
            if (Path(path) / NAMES_FILE).is_file():
                with np.load(Path(path) / NAMES_FILE) as z:  # a few MB of int64: milliseconds
                    self._names = (z["keys"], z["rows"])
                self._names_bm25 = _load_field_bm25(Path(path) / NAMES_BM25_DIR, self.config)

    # ------------------------------------------------------------------ opening

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        encoder: Any | None = None,
        config: RetrievalConfig | None = None,
        verify: bool | str = True,
    ) -> HybridRetriever:
        """Open an index directory (one local shard): verify its manifest and checksums, map BM25, docs, FAISS.

        ``config`` sets search behaviour (mode, rrf_k, weights, fusion_depth, n_threads, nprobe) as
        given; by default the config the index was built with. (To layer a user's settings on the
        stored ones, use :func:`medrwr.retrieval.open.open_retriever`.) ``encoder`` overrides the
        one recorded in the manifest (its ``dim`` must match).
        """
        t0 = time.perf_counter()
        shard = IndexShard.load(path, config, verify)
        enc_info = shard.manifest.get("encoder") or {}
        if encoder is not None and shard.dense is not None and int(encoder.dim) != int(shard.dense.dim):
            shard.close()
            raise IndexStoreError(
                f"encoder {getattr(encoder, 'name', encoder)!r} has dim {encoder.dim} but index {shard.path} was "
                f"built with {enc_info.get('name')!r} (dim {shard.dense.dim}); pass a matching encoder or rebuild"
            )
        if encoder is not None and enc_info and getattr(encoder, "name", None) != enc_info.get("name"):
            logger.warning("index %s was built with encoder %r; searching with %r",
                           shard.path, enc_info.get("name"), getattr(encoder, "name", encoder))
        self = cls(LocalShards([shard]), [shard.info()], config, encoder, path=shard.path, manifest=shard.manifest)
        logger.info("loaded index %s (%d docs, modes %s) in %.2fs",
                    shard.path, self.doc_count, self.modes, time.perf_counter() - t0)
        return self

    @classmethod
    def from_shard_dirs(
        cls, shard_dirs: Sequence[str | os.PathLike], config: RetrievalConfig | None = None, verify: bool | str = True
    ) -> HybridRetriever:
        """Every shard of a split index in this process (searched from a thread pool)."""
        shards = [IndexShard.load(p, config, verify) for p in shard_dirs]
        return cls(LocalShards(shards), [s.info() for s in shards], config)

    # ------------------------------------------------------------------ the contract

    @property
    def modes(self) -> tuple[str, ...]:
        return self._modes

    @property
    def default_mode(self) -> str:
        return self._default_mode

    @property
    def doc_count(self) -> int:
        return self._doc_count

    def describe(self) -> dict[str, Any]:
        enc = self.manifest.get("encoder") or self.infos[0].get("encoder") or {}
        out: dict[str, Any] = {
            "kind": "hybrid",
            "doc_count": self.doc_count,
            "modes": list(self.modes),
            "default_mode": self.default_mode,
            "encoder": (enc.get("name") or enc.get("spec")) if "dense" in self.modes else None,
            "path": str(self.path) if self.path is not None else None,
        }
        if len(self.infos) > 1:
            out["shards"] = [{"path": s.get("path"), "rows": s["rows"]} for s in self.infos]
        return out

    def close(self) -> None:
        self._shards.close()

    @property
    def encoder(self) -> Any:
        """The query encoder, loaded on first use from the manifest's spec."""
        if self._encoder is None:
            if "dense" not in self.modes:
                raise ValueError(f"{self._where()} has no dense part; only mode 'bm25' is available")
            from medrwr.retrieval.encoders.text import load_index_encoder

            info = self.manifest.get("encoder") or self.infos[0].get("encoder") or {}
            with self._lock:
                if self._encoder is None:
                    self._encoder = load_index_encoder(info, self.config, info.get("dim"), self._where())
        return self._encoder

    # ------------------------------------------------------------------ one local index

    def _single(self) -> IndexShard:
        if self._local is None or len(self._local) != 1:
            raise AttributeError(f"{self._where()} is sharded: its parts live in its shards")
        return self._local[0]

    @property
    def bm25(self) -> Any:
        return self._single().bm25

    @property
    def dense(self) -> Any:
        return self._single().dense

    @property
    def docs(self) -> Any:
        return self._single().docs

    def get_document(self, row: int) -> Document:
        return self._single().docs.get(row)

    # ------------------------------------------------------------------ search

    def _where(self) -> str:
        return f"index {self.path}" if self.path is not None else f"the {len(self.infos)}-shard index"

    def search(self, queries: Sequence[str], k: int = 3, mode: str | None = None) -> list[list[Hit]]:
        """Top-``k`` hits per query, best first, de-duplicated by doc_id and by identical text.

        ``mode``: ``bm25``, ``dense`` or ``hybrid`` (RRF of both); None = :attr:`default_mode`.
        Scores are BM25 scores, cosine similarities, or RRF scores respectively.
        """
        queries = check_search_args(queries, k)
        mode = check_mode(mode, self.modes, self.default_mode, self._where())
        if not queries:
            return []
        ranked, _ = self._rank(queries, int(k), mode)
        return self._hits(ranked, int(k))

    def name_matches(self, query: str) -> list[int]:
        """Rows of the documents that list ``query`` among their names (empty without a name table)."""
        if self._names is None:
            return []
        keys, rows = self._names
        h = _name_hash(name_norm(query))
        lo, hi = np.searchsorted(keys, h, side="left"), np.searchsorted(keys, h, side="right")
        return rows[lo:hi].tolist()

    def _name_bm25(self, queries: Sequence[str], depth: int) -> list[list[int]]:
        """Per query: the rows ranked by BM25 over their names alone (empty without a name table)."""
        return _field_ranking(self._names_bm25, queries, depth)

    def _name_dense(self, vectors: np.ndarray | None, depth: int) -> list[list[int]]:
        """Per query vector: rows ranked by their closest embedded name (empty without a name embedding)."""
        if vectors is None or self._names_dense_file is None:
            return [[] for _ in range(0 if vectors is None else len(vectors))]
        if self._names_dense is None:
            with self._lock:
                if self._names_dense is None:
                    from medrwr.retrieval.index.dense import _faiss

                    f = self._names_dense_file
                    self._names_dense = (_faiss().read_index(str(f)), np.load(f.with_name(NAMES_DENSE_ROWS)))
        index, rows = self._names_dense
        return _name_dense_ranking(index, rows, vectors, depth)

    def _clinical(self, queries: Sequence[str], depth: int) -> list[list[int]]:
        """Per query: the rows ranked by BM25 over their clinical text alone (empty without one)."""
        return _field_ranking(self._clinical_bm25, queries, depth)

    def explain(self, queries: Sequence[str], k: int = 3, mode: str | None = None) -> list[list[dict[str, Any]]]:
        """Per query, per hit (as :meth:`search` returns them): its BM25 / dense rank and score, whether
        it matched a name exactly, and the fused score; ``None`` where a part did not rank the hit."""
        queries = check_search_args(queries, k)
        mode = check_mode(mode, self.modes, self.default_mode, self._where())
        if not queries:
            return []
        ranked, parts = self._rank(queries, int(k), mode)
        rows_out: list[list[int]] = [[] for _ in queries]
        hits = self._hits(ranked, int(k), rows_out)
        out = []
        for q, (qhits, rows) in enumerate(zip(hits, rows_out)):
            pos = {m: {r: (i + 1, s) for i, (r, s) in reversed(list(enumerate(zip(*parts[m][q]))))}
                   for m in ("bm25", "dense") if m in parts}
            names = set(parts["names"][q]) if "names" in parts else set()
            name_rank = _first_ranks(parts["name_bm25"][q]) if "name_bm25" in parts else {}
            clinical_rank = _first_ranks(parts["clinical"][q]) if "clinical" in parts else {}
            name_dense_rank = _first_ranks(parts["name_dense"][q]) if "name_dense" in parts else {}
            rows_info = []
            for h, row in zip(qhits, rows):
                info: dict[str, Any] = {"doc_id": h.doc_id, "title": h.title, "source": h.source, "mode": mode,
                                        "fused_score": h.score if mode == "hybrid" else None}
                for m in ("bm25", "dense"):
                    rank_score = pos.get(m, {}).get(row)
                    info[m] = None if rank_score is None else {"rank": rank_score[0], "score": float(rank_score[1])}
                info["name_match"] = row in names
                info["name_bm25_rank"] = name_rank.get(row)
                info["clinical_rank"] = clinical_rank.get(row)
                info["name_dense_rank"] = name_dense_rank.get(row)
                rows_info.append(info)
            out.append(rows_info)
        return out

    def _rank(self, queries: Sequence[str], k: int, mode: str) -> tuple[list[list[tuple[int, float]]], dict[str, Any]]:
        """(ranked rows with scores per query, the parts: per-mode (rows, scores) and name-matched rows)."""
        cfg = self.config
        depth = min(self.doc_count, max(int(cfg.fusion_depth), int(k)))
        need = ("bm25", "dense") if mode == "hybrid" else (mode,)
        vectors = None
        if "dense" in need:
            from medrwr.retrieval.encoders.text import encode_queries

            vectors = encode_queries(self.encoder, queries, batch_size=cfg.batch_size)
        n = len(self._shards)
        calls = [self._shards.submit(i, "rankings", queries, depth, need, vectors) for i in range(n)]
        parts = [c.result() for c in calls]
        if n == 1:
            merged = parts[0]
        else:
            merged = {m: merge_rankings([p[m] for p in parts], depth, _LATER_FIRST[m]) for m in need}
        parts: dict[str, Any] = dict(merged)
        if mode == "hybrid":
            names = [self.name_matches(q) for q in queries] if cfg.name_weight > 0 else [[] for _ in queries]
            by_names = self._name_bm25(queries, depth) if cfg.name_bm25_weight > 0 else [[] for _ in queries]
            clinical = self._clinical(queries, depth) if cfg.clinical_weight > 0 else [[] for _ in queries]
            name_dense = (self._name_dense(vectors, depth) if cfg.name_dense_weight > 0
                          else [[] for _ in queries])
            parts.update(names=names, name_bm25=by_names, clinical=clinical, name_dense=name_dense)
            weights = [cfg.bm25_weight, cfg.dense_weight, cfg.name_weight, cfg.name_bm25_weight, cfg.clinical_weight,
                       cfg.name_dense_weight]
            ranked = [rrf_fuse([merged["bm25"][i][0], merged["dense"][i][0], names[i], by_names[i], clinical[i],
                                name_dense[i]], weights, cfg.rrf_k) for i in range(len(queries))]
        else:
            ranked = [list(zip(rows, scores)) for rows, scores in merged[mode]]
        return ranked, parts

    def _fetch(self, rows: Sequence[int]) -> dict[int, dict[str, Any]]:
        if len(self.infos) == 1:
            return dict(zip(rows, self._shards.submit(0, "documents", rows).result()))
        owner = np.searchsorted(self._starts, np.asarray(rows, dtype=np.int64), side="right") - 1
        by_shard: dict[int, list[int]] = {}
        for row, s in zip(rows, owner.tolist()):
            by_shard.setdefault(s, []).append(int(row))
        calls = {s: self._shards.submit(s, "documents", rs) for s, rs in by_shard.items()}
        out: dict[int, dict[str, Any]] = {}
        for s, call in calls.items():
            out.update(zip(by_shard[s], call.result()))
        return out

    def _hits(self, ranked: list[list[tuple[int, float]]], k: int,
              rows_out: list[list[int]] | None = None) -> list[list[Hit]]:
        """Documents for the ranked rows, de-duplicated by doc_id and by identical text.

        Documents are fetched in rounds (k candidates per query from one local index, 2k from
        shards), so duplicates cost another round only when they occur.
        """
        results: list[list[Hit]] = [[] for _ in ranked]
        seen_ids: list[set[str]] = [set() for _ in ranked]
        seen_text: list[set[str]] = [set() for _ in ranked]
        pos = [0] * len(ranked)
        window = k if self._local is not None and len(self._local) == 1 else 2 * k
        while True:
            todo = [q for q in range(len(ranked)) if len(results[q]) < k and pos[q] < len(ranked[q])]
            if not todo:
                return results
            wanted = {int(row) for q in todo for row, _ in ranked[q][pos[q] : pos[q] + window]}
            docs = self._fetch(sorted(wanted))
            for q in todo:
                for row, score in ranked[q][pos[q] : pos[q] + window]:
                    pos[q] += 1
                    d = docs[int(row)]
                    doc_id, text = str(d["doc_id"]), d.get("text") or ""
                    key = _dedup_key(text)
                    if doc_id in seen_ids[q] or (key and key in seen_text[q]):
                        continue
                    seen_ids[q].add(doc_id)
                    seen_text[q].add(key)
                    results[q].append(Hit(doc_id=doc_id, text=text, title=d.get("title") or "", score=float(score),
                                          source=d.get("source") or ""))
                    if rows_out is not None:
                        rows_out[q].append(int(row))
                    if len(results[q]) == k:
                        break
            window *= 2

    def __repr__(self) -> str:
        where = repr(str(self.path)) if self.path is not None else f"shards={len(self.infos)}"
        return f"HybridRetriever({where}, docs={self.doc_count}, modes={self.modes})"


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
        names: dict[str, list[int]] = {}
        name_texts: list[str] = []  # per row: its names (or its title), for the name BM25
        clinical_texts: list[str] = []  # per row: its clinical presentation ("" when none)
        name_list: list[str] = []  # every distinct name (per row, case-folded), for the name embedding
        name_rows: list[int] = []
        try:
            for doc in tqdm(documents, desc="read documents", unit="doc", disable=not show_progress):
                if not isinstance(doc, Document):
                    raise TypeError(f"build_index needs Document objects, got {type(doc).__name__}")
                meta = doc.metadata or {}
                clinical_texts.append(str(meta.get("clinical") or ""))  # the passage text holds it too
                if "names" in meta:  # to the name table
                    row = len(writer)
                    for nm in meta["names"]:
                        rows = names.setdefault(name_norm(str(nm)), [])
                        if not rows or rows[-1] != row:
                            rows.append(row)
                    name_texts.append("; ".join(str(x) for x in meta["names"]))
                    for nm in dict.fromkeys(str(x).strip().casefold() for x in meta["names"]):
                        if nm:
                            name_list.append(nm)
                            name_rows.append(row)
                else:
                    name_texts.append(doc.title)
                if meta.keys() & _FIELD_KEYS:  # indexed on their own, not stored per document
                    doc = dataclasses.replace(doc, metadata={k: v for k, v in meta.items() if k not in _FIELD_KEYS})
                writer.add(doc)
        finally:
            writer.close()
        names.pop("", None)
        if names:
            _write_names(tmp / NAMES_FILE, names)
        n = len(writer)
        if n == 0:
            raise ValueError("the corpus has no documents; nothing to index")
        store = DocStore(tmp)
        try:
            bm25 = _new_bm25(cfg)
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
            for texts, wanted, folder in ((name_texts, bool(names), NAMES_BM25_DIR),
                                          (clinical_texts, any(clinical_texts), CLINICAL_BM25_DIR)):
                if wanted:
                    field_bm25 = _new_bm25(cfg)
                    field_bm25.index(texts)
                    field_bm25.save(tmp / folder)
            del name_texts, clinical_texts
            enc_info = dense_info = names_dense_info = None
            if use_dense:
                enc_info, dense_info, encoder = _build_dense(store, tmp, cfg, encoder, show_progress)
                if name_list:
                    names_dense_info = _build_name_dense(encoder, name_list, name_rows, tmp, cfg, show_progress)
            del name_list, name_rows
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
            "build_config": cfg.settings(),
            "build_seconds": round(time.perf_counter() - t0, 2),
            "names": {"file": NAMES_FILE, "distinct": len(names)} if names else None,
            "clinical": {"dir": CLINICAL_BM25_DIR} if (tmp / CLINICAL_BM25_DIR).is_dir() else None,
            "names_dense": names_dense_info,
        }
        manifest.update(extra)
        write_manifest(tmp, manifest, known_sha256={DOCS_FILE: writer.corpus_sha256})
    logger.info("built index %s: %d documents in %.1fs", out, n, time.perf_counter() - t0)
    return out


def _build_name_dense(encoder: Any, names: list[str], rows: list[int], tmp: Path, cfg: RetrievalConfig,
                      show_progress: bool) -> dict[str, Any]:
    """Embed every name (as a passage) into an 8-bit scalar-quantised inner-product FAISS index."""
    from medrwr.retrieval.encoders.text import encode_to_memmap
    from medrwr.retrieval.index.dense import _faiss

    faiss = _faiss()
    scratch = tmp / "names_dense.tmp.npy"
    emb = encode_to_memmap(encoder, iter(names), len(names), scratch, cfg.batch_size, show_progress)
    dim = int(emb.shape[1])
    index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(names), size=min(len(names), 50_000), replace=False))
    train = np.ascontiguousarray(emb[sample], dtype=np.float32)
    faiss.normalize_L2(train)
    index.train(train)
    for start in range(0, len(names), 65_536):
        block = np.ascontiguousarray(emb[start : start + 65_536], dtype=np.float32)
        faiss.normalize_L2(block)
        index.add(block)
    del emb
    scratch.unlink()
    faiss.write_index(index, str(tmp / NAMES_DENSE_FILE))
    np.save(tmp / NAMES_DENSE_ROWS, np.asarray(rows, dtype=np.int32))
    return {"file": NAMES_DENSE_FILE, "rows": NAMES_DENSE_ROWS, "names": len(names), "quantizer": "SQ8",
            "metric": "inner_product"}


def _build_dense(
    store: DocStore, tmp: Path, cfg: RetrievalConfig, encoder: Any | str | None, show_progress: bool
) -> tuple[dict[str, Any], dict[str, Any], Any]:
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
    return enc_info, dense_info, encoder


__all__ = ["NAMES_FILE", "HybridRetriever", "build_index", "name_norm", "rrf_fuse"]
