"""Retrieval layer: corpora, BM25, dense, hybrid fusion, image index, index store, server and client.

Submodules import their heavy dependencies (bm25s, faiss, sentence-transformers) on use.
"""

from medrwr.retrieval.base import (
    FakeImageRetriever,
    FakeRetriever,
    Hit,
    ImageHit,
    ImageRetriever,
    Retriever,
)

__all__ = ["FakeImageRetriever", "FakeRetriever", "Hit", "ImageHit", "ImageRetriever", "Retriever"]
