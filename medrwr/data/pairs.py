"""Image–caption pairs, the input of ``medrwr data synth``: read and checked before any heavy work.

One JSON object per line (PubMedVision-style records work as they are):

- ``image`` (path) or ``images`` (list of paths), relative to ``--images DIR`` (absolute paths are kept);
- ``caption`` (or ``text``, ``conversations``' first gpt turn is *not* read: give the caption);
- ``id`` (optional; the row number otherwise);
- licence and provenance fields, carried to every question made from the pair and summed up in the data card:
  ``license`` / ``licence``, ``source``, ``url``, ``pmcid``, ``attribution``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrwr.errors import SynthesisError

__all__ = ["LICENCE_FIELDS", "Pair", "read_pairs"]

LICENCE_FIELDS = ("license", "licence", "source", "url", "pmcid", "attribution")


@dataclass(frozen=True)
class Pair:
    """One image–caption pair; ``images`` are absolute paths; ``provenance`` holds the licence fields it had."""

    id: str
    images: tuple[str, ...]
    caption: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "images": list(self.images), "caption": self.caption, "provenance": self.provenance}


def _images(rec: dict[str, Any], root: Path, where: str) -> tuple[str, ...]:
    value = rec.get("images", rec.get("image"))
    paths = [value] if isinstance(value, str) else value
    if not paths or not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise SynthesisError(f"{where}: needs 'image' (a path) or 'images' (a list of paths)")
    out = []
    for p in paths:
        full = Path(p) if os.path.isabs(p) else root / p
        if not full.is_file():
            raise SynthesisError(f"{where}: image {p!r} not found under {root}; pass the folder holding the "
                                 "images as --images")
        out.append(str(full.resolve()))
    return tuple(out)


def read_pairs(path: str | os.PathLike, images_dir: str | os.PathLike, limit: int | None = None) -> list[Pair]:
    """Every pair of ``path`` in file order; a missing image, caption or a repeated id is an error naming the line."""
    p, root = Path(path), Path(images_dir)
    if not p.is_file():
        raise SynthesisError(f"pairs file {p} does not exist (--pairs: JSONL with image and caption per line)")
    if not root.is_dir():
        raise SynthesisError(f"image folder {root} does not exist (--images)")
    pairs: list[Pair] = []
    seen: set[str] = set()
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SynthesisError(f"{where}: not valid JSON ({exc.msg}); one JSON object per line") from None
            if not isinstance(rec, dict):
                raise SynthesisError(f"{where}: expected a JSON object")
            caption = rec.get("caption", rec.get("text"))
            if not isinstance(caption, str) or not caption.strip():
                raise SynthesisError(f"{where}: needs a non-empty 'caption'")
            pid = str(rec.get("id", len(pairs)))
            if pid in seen:
                raise SynthesisError(f"{where}: id {pid!r} repeats an earlier line; ids must be unique")
            seen.add(pid)
            prov = {k: rec[k] for k in LICENCE_FIELDS if rec.get(k) not in (None, "")}
            pairs.append(Pair(pid, _images(rec, root, where), " ".join(caption.split()), prov))
            if limit is not None and len(pairs) >= limit:
                break
    if not pairs:
        raise SynthesisError(f"pairs file {p} has no pairs")
    return pairs
