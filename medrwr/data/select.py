"""Stage ``select``: embed the pair images, cluster them with k-means, sample round-robin across clusters.

Why: captions of one kind (chest X-rays, say) dominate PubMedVision; taking pairs cluster by cluster keeps the
question set diverse (METHOD.md §3). Resumable: embeddings are written in fixed-size chunks
(``select/embeddings/NNNNN.npy``, atomically), a rerun encodes only the missing chunks; the k-means and the
sampling are deterministic (``data.seed``), so ``select.jsonl`` is the same however often the stage was cut.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medrwr.config import DataConfig
from medrwr.data.journal import write_jsonl_atomic
from medrwr.data.pairs import Pair
from medrwr.errors import SynthesisError

logger = logging.getLogger(__name__)

__all__ = ["CHUNK", "SelectResult", "embed_pairs", "kmeans", "round_robin", "run_select"]

CHUNK = 256


@dataclass
class SelectResult:
    """What the stage did: pairs in, clusters, pairs selected, and where its files are."""

    pairs: int
    clusters: int
    selected: int
    cluster_sizes: list[int]
    selected_per_cluster: list[int]
    path: Path
    plot: Path | None


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.npy")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def embed_pairs(pairs: list[Pair], encoder: Any, folder: Path, on_chunk: Callable[[int], None] | None = None,
                chunk: int = CHUNK) -> np.ndarray:
    """The first image of every pair as one L2-normalised row, computed chunk by chunk (cached in ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = hashlib.sha256("\n".join(p.id for p in pairs).encode()).hexdigest()
    meta = {"encoder": getattr(encoder, "name", type(encoder).__name__), "pairs_sha256": ids, "chunk": chunk}
    meta_path = folder / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if old != meta:
            raise SynthesisError(f"{folder} holds embeddings of other pairs or another encoder ({old.get('encoder')}); "
                                 "use a new --out or delete that folder")
    else:
        meta_path.write_text(json.dumps(meta), encoding="utf-8")
    parts = []
    for c, start in enumerate(range(0, len(pairs), chunk)):
        path = folder / f"{c:05d}.npy"
        if path.exists():
            arr = np.load(path)
        else:
            arr = np.asarray(encoder.encode_images([p.images[0] for p in pairs[start:start + chunk]]), np.float32)
            _save_npy_atomic(path, arr)
            if on_chunk is not None:
                on_chunk(c)
        parts.append(arr)
    return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def kmeans(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and centroids of ``k``-means over the rows of ``x`` (scikit-learn; FAISS when it is absent)."""
    from medrwr._imports import is_available

    k = max(1, min(k, len(x)))
    if is_available("sklearn"):
        import warnings

        from sklearn.cluster import KMeans

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fewer distinct points than clusters: sklearn warns, result is fine
            km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x.astype(np.float64))
        return km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)
    from medrwr._imports import require

    faiss = require("faiss", "data", "k-means clustering")
    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, verbose=False, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    _, labels = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return labels[:, 0].astype(np.int64), km.centroids


def round_robin(labels: np.ndarray, n: int, seed: int) -> list[int]:
    """Pick ``n`` indices taking one per cluster in turn (largest clusters first), shuffled within a cluster.

    >>> labels = np.array([0, 0, 0, 1, 2])
    >>> sorted(labels[round_robin(labels, 3, seed=0)].tolist())
    [0, 1, 2]
    """
    rng = np.random.default_rng(seed)
    clusters = sorted(set(labels.tolist()), key=lambda c: (-int((labels == c).sum()), c))
    queues = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in clusters}
    out: list[int] = []
    while len(out) < n and any(queues.values()):
        for c in clusters:
            if queues[c] and len(out) < n:
                out.append(int(queues[c].pop(0)))
    return out


def _plot(sizes: list[int], chosen: list[int], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no cluster-size plot")
        return None
    order = np.argsort(sizes)[::-1]
    fig, ax = plt.subplots(figsize=(max(4.0, min(16.0, 0.25 * len(sizes) + 3)), 3.2))
    xs = np.arange(len(sizes))
    ax.bar(xs, [sizes[i] for i in order], color="#c8d6e5", label="pairs")
    ax.bar(xs, [chosen[i] for i in order], color="#2e86de", label="selected")
    ax.set_xlabel("cluster (largest first)")
    ax.set_ylabel("pairs")
    ax.set_title(f"{len(sizes)} image clusters, {sum(chosen)} of {sum(sizes)} pairs selected")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.png")
    fig.savefig(tmp, dpi=100, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run_select(pairs: list[Pair], out: Path, cfg: DataConfig, encoder: Any | None = None,
               on_chunk: Callable[[int], None] | None = None, chunk: int = CHUNK) -> SelectResult:
    """Write ``out/select.jsonl`` (selected pairs in selection order, with their cluster) and ``select/clusters.png``."""
    from medrwr.retrieval.encoders.image import load_image_encoder

    enc = encoder if encoder is not None else load_image_encoder(cfg.image_encoder)
    x = embed_pairs(pairs, enc, out / "select" / "embeddings", on_chunk, chunk)
    n_select = min(len(pairs), math.ceil(cfg.n * cfg.oversample))
    k = cfg.clusters or max(1, min(round(math.sqrt(len(pairs))), n_select))
    labels, _ = kmeans(x, k, cfg.seed)
    k = int(labels.max()) + 1
    picked = round_robin(labels, n_select, cfg.seed)
    sizes = np.bincount(labels, minlength=k).tolist()
    chosen = np.bincount(labels[picked], minlength=k).tolist() if picked else [0] * k
    rows = [dict(pairs[i].to_dict(), rank=r, cluster=int(labels[i])) for r, i in enumerate(picked)]
    path = out / "select.jsonl"
    plot = _plot(sizes, chosen, out / "select" / "clusters.png")
    (out / "select" / "clusters.json").write_text(json.dumps(
        {"encoder": getattr(enc, "name", ""), "clusters": k, "sizes": sizes, "selected": chosen}, indent=1),
        encoding="utf-8")
    write_jsonl_atomic(path, rows)
    logger.info("select: %d pairs, %d clusters, %d selected", len(pairs), k, len(rows))
    return SelectResult(len(pairs), k, len(rows), sizes, chosen, path, plot)
