"""Sparse retrieval on bm25s: one class with four verbs (index, search, save, load).

Tokenisation is bm25s's (lower-case, ``\\w\\w+`` words, optional stopwords and PyStemmer stemming);
queries and documents go through the same function. Texts are tokenised in streaming batches, so
only token ids (compact int32 arrays, not the texts) are held while indexing: about 4 bytes per
token, i.e. ~0.25 GB for a million 60-token passages, plus bm25s's score matrix.

``search`` scores a whole batch with one sparse matrix product over bm25s's score matrix (see
:meth:`BM25Index._search_sparse_matmul`); bm25s's per-query ``retrieve`` stays available.
``save`` writes bm25s's own pickle-free layout (``.npy`` arrays + JSON vocab/params) plus
``medrwr_bm25.json`` with our tokenisation settings; ``load`` memory-maps the arrays.
"""

from __future__ import annotations

import json
import logging
import os
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medrwr._imports import require

logger = logging.getLogger(__name__)


def _bm25s() -> Any:
    """Import bm25s, undoing its import-time ``setLevel(DEBUG)`` so its logs follow the application's level."""
    module = require("bm25s", "retrieval", "BM25 retrieval")
    logging.getLogger("bm25s").setLevel(logging.NOTSET)
    return module

PARAMS_FILE = "medrwr_bm25.json"
_TOKEN_BATCH = 10_000


def _stemmer(language: str | None) -> Any:
    if not language:
        return None
    Stemmer = require("Stemmer", "retrieval", "BM25 stemming (PyStemmer)")
    try:
        return Stemmer.Stemmer(language)
    except KeyError:
        raise ValueError(
            f"unknown stemmer language {language!r}; choose one of {sorted(Stemmer.algorithms())} or None"
        ) from None


class BM25Index:
    """BM25 over a fixed list of texts; row ``i`` of the results is the ``i``-th indexed text.

    ``stemmer``: a PyStemmer language (``"english"``) or None; ``stopwords``: ``"en"``, a list of
    words, or None. ``n_threads`` is passed to ``bm25s.BM25.retrieve`` (0 = sequential, -1 = all CPUs).
    """

    def __init__(
        self,
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        stemmer: str | None = "english",
        stopwords: str | list[str] | None = "en",
        n_threads: int = 0,
    ):
        self.k1, self.b, self.method = float(k1), float(b), method
        self.stemmer_name = stemmer
        self.stopwords = stopwords
        self.n_threads = n_threads
        self._stemmer = _stemmer(stemmer)
        self._bm25: Any = None
        self.use_bm25s_retrieve = False
        """True: score through ``bm25s.BM25.retrieve`` (per-query, threaded) instead of the sparse product."""

    # -------------------------------------------------------------- tokenisation

    def tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        """The exact tokens BM25 sees (lower-cased words, stopwords removed, stemmed)."""
        bm25s = _bm25s()
        return bm25s.tokenize(
            list(texts),
            stopwords=self.stopwords if self.stopwords else [],
            stemmer=self._stemmer,
            return_ids=False,
            show_progress=False,
        )

    # -------------------------------------------------------------- verbs

    def index(self, texts: Iterable[str], show_progress: bool = False) -> BM25Index:
        """Tokenise ``texts`` in batches (streaming) and build the score matrix."""
        bm25s = _bm25s()
        vocab: dict[str, int] = {}
        ids: list[array] = []  # int32 arrays: ~4 bytes per token instead of ~36 for lists of ints
        batch: list[str] = []

        def flush() -> None:
            for toks in self.tokenize(batch):
                row = []
                for t in toks:
                    j = vocab.get(t)
                    if j is None:
                        j = vocab[t] = len(vocab)
                    row.append(j)
                ids.append(array("i", row))
            batch.clear()

        for text in texts:
            batch.append(text)
            if len(batch) >= _TOKEN_BATCH:
                flush()
        if batch:
            flush()
        if not ids:
            raise ValueError("cannot build a BM25 index over zero documents")
        if "" not in vocab:  # the empty token scores queries that have no known word
            vocab[""] = len(vocab)
        model = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        model.index((ids, vocab), show_progress=show_progress)
        self._bm25 = model
        return self

    @property
    def n_docs(self) -> int:
        if self._bm25 is None:
            return 0
        return int(self._bm25.scores["num_docs"])

    def search(
        self, queries: Sequence[str], k: int, n_threads: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for every query: ``(ids (nq, k) int64, scores (nq, k) float32)``, best first.

        Only documents sharing a term with the query are returned; the rest of a row is padded with
        id -1 and score 0 (a query with no known word gives a row of -1). ``k`` larger than the
        corpus is clipped to the corpus size. The batch is scored with one sparse matrix product
        over bm25s's score matrix; ``use_bm25s_retrieve=True`` (and the BM25L/BM25+ variants) use
        ``bm25s.BM25.retrieve`` with ``n_threads`` instead.
        """
        if self._bm25 is None:
            raise RuntimeError("BM25Index is empty: call index() or BM25Index.load() first")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), self.n_docs)
        if len(queries) == 0:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        if self._bm25.nonoccurrence_array is None and not self.use_bm25s_retrieve:
            return self._search_sparse_matmul(self.tokenize(queries), k)
        tokens = [t if t else [""] for t in self.tokenize(queries)]
        threads = self.n_threads if n_threads is None else n_threads
        if threads == -1:
            threads = os.cpu_count() or 1
        chunksize = max(1, -(-len(tokens) // threads)) if threads > 0 else 50
        docs, scores = self._bm25.retrieve(
            tokens, k=k, show_progress=False, n_threads=threads, chunksize=chunksize
        )
        ids = np.asarray(docs, dtype=np.int64).reshape(len(queries), k)
        out_scores = np.asarray(scores, dtype=np.float32).reshape(len(queries), k)
        if self._bm25.nonoccurrence_array is None:
            ids[out_scores <= 0] = -1  # same convention as the sparse product: no shared term, no hit
        return ids, out_scores

    def _search_sparse_matmul(self, tokens: list[list[str]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Score the whole batch with one sparse product: (queries x terms) @ (terms x docs).

        bm25s stores scores column-wise per term (CSC over docs x terms), which read as CSR is the
        terms x docs matrix. Only the rows of the batch's terms are gathered, so the cost is the
        length of their posting lists, in C, instead of a Python loop and a dense pass over every
        document per query. Scores equal bm25s's (a repeated query term counts once per occurrence).
        """
        import scipy.sparse as sp

        vocab = self._bm25.vocab_dict
        nq = len(tokens)
        q_ids = [[vocab[t] for t in toks if t and t in vocab] for toks in tokens]
        union = np.unique(np.fromiter((j for row in q_ids for j in row), dtype=np.int64))
        ids = np.full((nq, k), -1, dtype=np.int64)
        scores = np.zeros((nq, k), dtype=np.float32)
        if union.size == 0:
            return ids, scores
        sc = self._bm25.scores
        data, indices, indptr = sc["data"], sc["indices"], sc["indptr"]
        starts, ends = (
            np.asarray(indptr[union], dtype=np.int64),
            np.asarray(indptr[union + 1], dtype=np.int64),
        )
        lengths = ends - starts
        sub_indptr = np.zeros(len(union) + 1, dtype=np.int64)
        np.cumsum(lengths, out=sub_indptr[1:])
        sub_data = np.concatenate([data[a:b] for a, b in zip(starts, ends)]).astype(np.float32, copy=False)
        sub_idx = np.concatenate([indices[a:b] for a, b in zip(starts, ends)])
        terms_x_docs = sp.csr_matrix((sub_data, sub_idx, sub_indptr), shape=(len(union), self.n_docs))
        col = {int(j): c for c, j in enumerate(union)}
        rows = np.repeat(np.arange(nq), [len(r) for r in q_ids])
        cols = np.fromiter((col[j] for r in q_ids for j in r), dtype=np.int64, count=len(rows))
        q = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(nq, len(union)))
        res = (q @ terms_x_docs).tocsr()
        for i in range(nq):
            a, b = res.indptr[i], res.indptr[i + 1]
            if a == b:
                continue
            d, v = res.indices[a:b], res.data[a:b]
            if b - a > k:
                part = np.argpartition(-v, k - 1)[:k]
                d, v = d[part], v[part]
            order = np.lexsort((d, -v))  # best score first, ties by row
            ids[i, : len(order)] = d[order]
            scores[i, : len(order)] = v[order]
        return ids, scores

    def save(self, directory: str | os.PathLike) -> None:
        """Write the bm25s arrays (``.npy``, no pickle) + vocab/params JSON + our settings."""
        if self._bm25 is None:
            raise RuntimeError("nothing to save: call index() first")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._bm25.save(str(d), allow_pickle=False, show_progress=False)
        params = {
            "k1": self.k1,
            "b": self.b,
            "method": self.method,
            "stemmer": self.stemmer_name,
            "stopwords": self.stopwords,
            "n_docs": self.n_docs,
        }
        (d / PARAMS_FILE).write_text(json.dumps(params, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True, n_threads: int = 0) -> BM25Index:
        """Load an index written by :meth:`save`; arrays are memory-mapped unless ``mmap=False``."""
        bm25s = _bm25s()
        d = Path(directory)
        pfile = d / PARAMS_FILE
        if not pfile.is_file():
            raise FileNotFoundError(f"{d} is not a medrwr BM25 index (no {PARAMS_FILE})")
        params = json.loads(pfile.read_text(encoding="utf-8"))
        self = cls(
            k1=params["k1"],
            b=params["b"],
            method=params["method"],
            stemmer=params["stemmer"],
            stopwords=params["stopwords"],
            n_threads=n_threads,
        )
        self._bm25 = bm25s.BM25.load(str(d), mmap=mmap, allow_pickle=False, load_corpus=False)
        return self


__all__ = ["BM25Index"]
