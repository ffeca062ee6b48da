"""Small file helpers shared across layers (no medrwr imports)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 4 * 1024 * 1024) -> str:
    """The hex sha256 of a file, read in chunks (indexes, GGUF files and encoder tables can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
