"""Sharded retrieval: an index split into N document ranges, searched in parallel, merged exactly.

Why exact: a shard built from its own documents would have its own BM25 statistics (IDF, average
length), so its scores could not be compared with another shard's. :func:`split_index` instead
*slices* the built index: each shard keeps the global BM25 score matrix's columns for its rows
(scores computed with whole-corpus statistics) and its rows of the embedding matrix. Every shard's
BM25 and inner-product scores are then the unsharded index's scores, and merging per-shard top-D
lists by score gives the unsharded top-D. Hybrid mode fuses the *merged* per-mode lists by
reciprocal rank (ranks only mean something globally), exactly as :class:`HybridRetriever` does.
Exact for ``flat`` FAISS indexes; ``ivf``/``hnsw`` shards are re-trained per shard (approximate).

Pieces:

- :func:`split_index` writes ``shard-000-of-00N/`` … index directories (each a normal index, with a
  ``shard`` section in its manifest giving its row range).
- :class:`IndexShard` serves one shard: per-mode rankings (global row ids + scores) and documents.
  It never loads the text encoder: the router encodes each batch once and sends the vectors.
- :class:`ShardedRetriever` is the router: a :class:`~medrwr.retrieval.base.Retriever` that fans each
  batch out to every shard, merges, fuses and builds hits. Shards are local objects (threads) or
  Ray Serve deployments (:func:`deploy`, extra ``ray``); the merge code is the same.
- :func:`serve_sharded` runs ``medrwr serve retrieval --ray --shards N``: shards and router on
  Ray Serve, our HTTP service (batching, limits, metrics) in front.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from medrwr.config import RetrievalConfig
from medrwr.retrieval.base import SEARCH_MODES, Hit, check_search_args

logger = logging.getLogger(__name__)

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
    from medrwr.retrieval.index.hybrid import BM25_DIR, EMBEDDINGS_FILE
    from medrwr.retrieval.index.store import (
        DOCS_FILE,
        RESERVED_KEYS,
        DocStore,
        DocStoreWriter,
        atomic_index_dir,
        load_manifest,
        write_manifest,
    )

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
    """One shard's BM25 + FAISS search, in global row ids. Holds no text encoder.

    ``rankings`` returns, per mode and per query, ``(rows, scores)`` best first: BM25 keeps positive
    scores only and dense drops FAISS's -1 padding, as the unsharded retriever does.
    """

    def __init__(self, path: str | os.PathLike, config: RetrievalConfig | None = None):
        from medrwr.retrieval.index.hybrid import HybridRetriever

        self.retriever = HybridRetriever.load(path, config=config)
        shard = self.retriever.manifest.get("shard") or {}
        self.row_offset = int(shard.get("row_offset", 0))
        self.doc_count = self.retriever.doc_count
        self.modes = tuple(self.retriever.modes)

    def info(self) -> dict[str, Any]:
        m = self.retriever.manifest
        return {
            "path": str(self.retriever.path),
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
            ids, scores = self.retriever.bm25.search(list(queries), depth)
            out["bm25"] = [((ids[i][scores[i] > 0] + off).tolist(), scores[i][scores[i] > 0].tolist())
                           for i in range(len(queries))]
        if "dense" in modes:
            if self.retriever.dense is None:
                raise ValueError(f"shard {self.retriever.path} has no dense part; only mode 'bm25' is available")
            if query_vectors is None:
                raise ValueError("dense rankings need the query vectors (the router encodes them)")
            scores, ids = self.retriever.dense.search(np.asarray(query_vectors, dtype=np.float32), depth)
            out["dense"] = [((ids[i][ids[i] >= 0] + off).tolist(), scores[i][ids[i] >= 0].tolist())
                            for i in range(len(queries))]
        return out

    def documents(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        """Stored documents for global ``rows`` (all in this shard)."""
        return [self.retriever.docs.raw(int(r) - self.row_offset) for r in rows]


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


class _LocalShards:
    """In-process shards, called from a small thread pool (FAISS/bm25s release the GIL)."""

    def __init__(self, shards: Sequence[IndexShard]):
        self.shards = list(shards)
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.shards)), thread_name_prefix="medrwr-shard")

    def __len__(self) -> int:
        return len(self.shards)

    def submit(self, i: int, method: str, *args: Any) -> Any:
        return self._pool.submit(getattr(self.shards[i], method), *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class _RayShards:
    """Ray Serve deployment handles; ``.remote()`` returns a response with ``.result()`` like a Future."""

    def __init__(self, handles: Sequence[Any]):
        self.handles = list(handles)

    def __len__(self) -> int:
        return len(self.handles)

    def submit(self, i: int, method: str, *args: Any) -> Any:
        return getattr(self.handles[i], method).remote(*args)

    def close(self) -> None:
        pass


class ShardedRetriever:
    """The router: a :class:`~medrwr.retrieval.base.Retriever` over N shards with exact merging.

    Each batch: encode the queries once (dense/hybrid), ask every shard for its per-mode top-D
    (D = max(fusion_depth, k), as the unsharded retriever uses), merge by score, fuse by RRF for
    hybrid, then fetch the documents and de-duplicate exactly like :class:`HybridRetriever`.
    """

    def __init__(
        self,
        shards: Any,
        infos: Sequence[dict[str, Any]],
        config: RetrievalConfig | None = None,
        encoder: Any = None,
    ):
        if not infos:
            raise ValueError("a sharded retriever needs at least one shard")
        self._shards = shards
        self.infos = sorted(infos, key=lambda s: s["rows"][0])
        if [s["rows"][0] for s in self.infos] != [s["rows"][0] for s in infos]:
            raise ValueError("shards must be given in row order")
        for a, b in zip(self.infos, self.infos[1:]):
            if a["rows"][1] != b["rows"][0]:
                raise ValueError(f"shard row ranges are not contiguous: {a['rows']} then {b['rows']}")
        first = self.infos[0]
        parents = {json.dumps(s.get("parent"), sort_keys=True) for s in self.infos}
        if len(parents) > 1:
            raise ValueError("the shards come from different parent indexes; split one index with split_index")
        if config is None:
            from medrwr.retrieval.index.hybrid import _config_from_manifest

            config = _config_from_manifest({"build_config": first.get("build_config")})
        self.config = config
        self.modes: tuple[str, ...] = tuple(m for m in SEARCH_MODES if all(m in s["modes"] for s in self.infos))
        self.doc_count = self.infos[-1]["rows"][1] - first["rows"][0]
        self.manifest = {"encoder": first.get("encoder"), "shards": len(self.infos), "doc_count": self.doc_count}
        self._starts = np.asarray([s["rows"][0] for s in self.infos], dtype=np.int64)
        self._encoder = encoder
        self._lock = threading.Lock()

    @classmethod
    def from_dirs(cls, shard_dirs: Sequence[str | os.PathLike], config: RetrievalConfig | None = None) -> ShardedRetriever:
        """Load every shard in this process (threads fan out); for tests and single-machine use."""
        shards = [IndexShard(p, config) for p in shard_dirs]
        return cls(_LocalShards(shards), [s.info() for s in shards], config)

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from medrwr.retrieval.encoders.text import load_index_encoder

            info = self.manifest.get("encoder") or {}
            with self._lock:
                if self._encoder is None:
                    self._encoder = load_index_encoder(info, self.config, info.get("dim"), "the sharded index")
        return self._encoder

    def warmup(self) -> None:
        for mode in self.modes:
            self.search(["warmup"], k=1, mode=mode)

    def search(self, queries: Sequence[str], k: int = 3, mode: str | None = None) -> list[list[Hit]]:
        queries = check_search_args(queries, k)
        mode = mode or self.config.mode
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} is not available on these shards (available: {', '.join(self.modes)})")
        if not queries:
            return []
        depth = min(self.doc_count, max(int(self.config.fusion_depth), int(k)))
        need = ("bm25", "dense") if mode == "hybrid" else (mode,)
        vectors = None
        if "dense" in need:
            from medrwr.retrieval.encoders.text import encode_queries

            vectors = encode_queries(self.encoder, queries, batch_size=self.config.batch_size)
        calls = [self._shards.submit(i, "rankings", queries, depth, need, vectors) for i in range(len(self._shards))]
        parts = [c.result() for c in calls]
        merged = {m: merge_rankings([p[m] for p in parts], depth, _LATER_FIRST[m]) for m in need}
        if mode == "hybrid":
            from medrwr.retrieval.index.hybrid import rrf_fuse

            weights = [self.config.bm25_weight, self.config.dense_weight]
            ranked = [
                rrf_fuse([merged["bm25"][i][0], merged["dense"][i][0]], weights, self.config.rrf_k)
                for i in range(len(queries))
            ]
        else:
            ranked = [list(zip(rows, scores)) for rows, scores in merged[mode]]
        return self._hits(ranked, int(k))

    def _fetch(self, rows: Sequence[int]) -> dict[int, dict[str, Any]]:
        owner = np.searchsorted(self._starts, np.asarray(rows, dtype=np.int64), side="right") - 1
        by_shard: dict[int, list[int]] = {}
        for row, s in zip(rows, owner.tolist()):
            by_shard.setdefault(s, []).append(int(row))
        calls = {s: self._shards.submit(s, "documents", rs) for s, rs in by_shard.items()}
        out: dict[int, dict[str, Any]] = {}
        for s, call in calls.items():
            out.update(zip(by_shard[s], call.result()))
        return out

    def _hits(self, ranked: list[list[tuple[int, float]]], k: int) -> list[list[Hit]]:
        """Documents for the ranked rows, de-duplicated by doc_id and text as HybridRetriever does.

        Documents are fetched in rounds (2k candidates per query first), so duplicates cost a
        second round only when they occur.
        """
        from medrwr.retrieval.index.hybrid import _dedup_key

        results: list[list[Hit]] = [[] for _ in ranked]
        seen_ids: list[set[str]] = [set() for _ in ranked]
        seen_text: list[set[str]] = [set() for _ in ranked]
        pos = [0] * len(ranked)
        window = 2 * k
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
                    if len(results[q]) == k:
                        break
            window *= 2

    def close(self) -> None:
        self._shards.close()

    def __repr__(self) -> str:
        return f"ShardedRetriever(shards={len(self.infos)}, docs={self.doc_count}, modes={self.modes})"


# ------------------------------------------------------------------------------------------ Ray Serve


def _ray_serve() -> Any:
    from medrwr._imports import require

    require("ray", "ray", "sharded retrieval on Ray Serve")
    return require("ray.serve", "ray", "sharded retrieval on Ray Serve")


def build_ray_app(shard_dirs: Sequence[str | os.PathLike], config: RetrievalConfig | None = None,
                  shard_cpus: float = 0.5, router_cpus: float = 0.5) -> Any:
    """The Ray Serve application: one deployment per shard, a router deployment bound to them all."""
    serve = _ray_serve()

    @serve.deployment(ray_actor_options={"num_cpus": shard_cpus}, max_ongoing_requests=8)
    class RetrievalShard:
        def __init__(self, path: str, cfg: RetrievalConfig | None):
            self.shard = IndexShard(path, cfg)

        def info(self) -> dict[str, Any]:
            return self.shard.info()

        def rankings(self, queries: list[str], depth: int, modes: list[str], vectors: Any = None) -> Any:
            return self.shard.rankings(queries, depth, modes, vectors)

        def documents(self, rows: list[int]) -> list[dict[str, Any]]:
            return self.shard.documents(rows)

    @serve.deployment(ray_actor_options={"num_cpus": router_cpus}, max_ongoing_requests=64)
    class RetrievalRouter:
        def __init__(self, cfg: RetrievalConfig | None, *shard_handles: Any):
            self._handles = list(shard_handles)
            self._cfg = cfg
            self._retriever: ShardedRetriever | None = None

        async def _router(self) -> ShardedRetriever:
            if self._retriever is None:
                import asyncio

                infos = await asyncio.gather(*(h.info.remote() for h in self._handles))
                self._retriever = ShardedRetriever(_RayShards(self._handles), infos, self._cfg)
            return self._retriever

        async def info(self) -> dict[str, Any]:
            r = await self._router()
            return {"doc_count": r.doc_count, "modes": list(r.modes), "manifest": r.manifest,
                    "default_mode": r.config.mode, "shards": r.infos}

        async def search(self, queries: list[str], k: int, mode: str | None) -> list[list[dict[str, Any]]]:
            import asyncio

            r = await self._router()
            # The merge code blocks on shard responses: run it off the replica's event loop.
            hits = await asyncio.to_thread(r.search, queries, k, mode)
            return [[h.to_dict() for h in hs] for hs in hits]

    shards = [
        RetrievalShard.options(name=f"medrwr-shard-{i}").bind(str(Path(p).absolute()), config)
        for i, p in enumerate(shard_dirs)
    ]
    return RetrievalRouter.options(name="medrwr-router").bind(config, *shards)


class RayShardedRetriever:
    """A :class:`~medrwr.retrieval.base.Retriever` calling the Ray Serve router deployment."""

    def __init__(self, handle: Any, timeout_s: float = 60.0):
        self._handle = handle
        self.timeout_s = timeout_s
        info = handle.info.remote().result(timeout_s=timeout_s)
        self.doc_count = int(info["doc_count"])
        self.modes = tuple(info["modes"])
        self.default_mode = info["default_mode"]
        self.manifest = info["manifest"]
        self.shards = info["shards"]

    def search(self, queries: Sequence[str], k: int = 3, mode: str | None = None) -> list[list[Hit]]:
        out = self._handle.search.remote(list(queries), int(k), mode).result(timeout_s=self.timeout_s)
        return [[Hit.from_dict(h) for h in hs] for hs in out]

    def warmup(self) -> None:
        for mode in self.modes:
            self.search(["warmup"], k=1, mode=mode)


def deploy(shard_dirs: Sequence[str | os.PathLike], config: RetrievalConfig | None = None,
           app_name: str = "medrwr-retrieval", **kwargs: Any) -> RayShardedRetriever:
    """Start (or reuse) Ray Serve in the connected Ray cluster and deploy shards + router.

    Call ``ray.init(...)`` first to choose the cluster; otherwise a local one is started. Ray's own
    HTTP proxy is disabled: HTTP goes through our service (:func:`serve_sharded`).
    """
    import ray

    serve = _ray_serve()
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    serve.start(proxy_location="Disabled")
    t0 = time.perf_counter()
    handle = serve.run(build_ray_app(shard_dirs, config, **kwargs), name=app_name, route_prefix=None)
    retriever = RayShardedRetriever(handle)
    logger.info("deployed %d shards on Ray Serve in %.1fs", len(shard_dirs), time.perf_counter() - t0)
    return retriever


def serve_sharded(index_path: str | os.PathLike | None, n_shards: int, config: Any = None,
                  shards_dir: str | os.PathLike | None = None, log_level: str = "warning",
                  on_ready: Any = None) -> None:
    """``medrwr serve retrieval --ray --shards N``: split (or reuse shards), deploy on Ray Serve, serve HTTP."""
    from medrwr.config import Config, ServerConfig
    from medrwr.retrieval.service.server import bind_socket, serve

    # As serve(): a full Config, or a ServerConfig (host, port, key must not fall back to defaults).
    full = config if isinstance(config, Config) else Config(server=config or ServerConfig())
    sock = bind_socket(full.server.host, full.server.port)  # a taken port fails before Ray starts
    sock.close()
    if index_path is None:
        from medrwr.kb.default import ensure_default_index

        index_path = ensure_default_index()
    src = Path(index_path).expanduser()
    out = Path(shards_dir) if shards_dir else src.parent / f"{src.name}.shards-{n_shards}"
    shard_dirs = split_index(src, out, n_shards)
    import ray

    try:
        retriever = deploy(shard_dirs, full.retrieval if isinstance(config, Config) else None)
        serve(None, config=full, retriever=retriever, log_level=log_level, on_ready=on_ready)
    finally:
        from ray import serve as ray_serve

        ray_serve.shutdown()
        ray.shutdown()


__all__ = [
    "IndexShard",
    "RayShardedRetriever",
    "ShardedRetriever",
    "build_ray_app",
    "deploy",
    "merge_rankings",
    "serve_sharded",
    "shard_bounds",
    "split_index",
]
