"""Index structures: corpus reading, the checksummed store, BM25, FAISS, hybrid search, the image index."""
