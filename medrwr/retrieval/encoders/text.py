"""Text encoders: the protocol, sentence-transformers by hub id or path, the packaged defaults.

- :class:`TextEncoder` is the protocol (``name``, ``dim``, ``encode``); :class:`SentenceTransformerEncoder`
  wraps any sentence-transformers model by hub id or local path (BGE-M3, MedCPT, e5, ...).
- :func:`load_text_encoder` resolves a spec: ``default``/``minilm`` (the packaged all-MiniLM-L6-v2,
  no download), ``static-minilm`` (a distilled static encoder), or a hub id / path.
- :func:`encode_to_memmap` writes embeddings to a memory-mapped ``.npy`` while encoding, so
  building over millions of passages needs RAM for one batch, not for the matrix.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from medrwr._imports import require
from medrwr.assets import minilm_dir
from medrwr.errors import EncoderError

logger = logging.getLogger(__name__)

@runtime_checkable
class TextEncoder(Protocol):
    """Maps texts to float32, L2-normalised vectors of shape ``(n, dim)``."""

    name: str
    dim: int

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray: ...


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
            minilm_dir(),
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
            from medrwr.retrieval.encoders.static import load_static_encoder
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
        from medrwr.errors import IndexStoreError

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


__all__ = [
    "SentenceTransformerEncoder",
    "TextEncoder",
    "encode_queries",
    "encode_to_memmap",
    "encoder_spec",
    "l2_normalize",
    "load_index_encoder",
    "load_text_encoder",
]
