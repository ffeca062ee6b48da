"""ECBench (echocardiography, Med-RwR): not released yet. The loader reads the row format the Med-RwR fork of
ms-swift expects (``ECBenchPreprocessor``): ``<root>/test.jsonl`` (or ``.json``, or the file itself) with
``id``, ``images`` (a list: frames or views), ``question`` (choices inline), ``answer`` (a letter or
``"B. text"``), optional ``options`` and ``similar_image`` (CDIR's case image, kept in ``meta``). Paths are
relative to the file's folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medrwr.eval.datasets._common import Layout, image_path
from medrwr.eval.datasets.jsonl import iter_items, parse_item, resolve_file
from medrwr.eval.record import EvalRecord

__all__ = ["DEFAULT_SPLIT", "LAYOUT", "records"]

LAYOUT = Layout(
    "ecbench",
    "<root>/test.jsonl with id, images (list), question (choices inline), answer (letter or 'B. text')",
    "the Med-RwR authors (data not publicly released as of 2025-11; https://github.com/xmed-lab/Med-RwR)",
)
DEFAULT_SPLIT = "test"


def records(path: Path, split: str) -> Iterator[EvalRecord]:
    file = resolve_file(path, split, LAYOUT)
    return _records(file, split)


def _records(file: Path, split: str) -> Iterator[EvalRecord]:
    seen: set[str] = set()
    for n, obj in iter_items(file, LAYOUT):
        where = f"{file}:{n}"
        similar = obj.pop("similar_image", None)
        rec = parse_item(obj, benchmark="ecbench", split=split, base=file.parent, layout=LAYOUT, where=where)
        if rec.id in seen:
            raise LAYOUT.error(f"{where}: duplicate id {rec.id!r}")
        seen.add(rec.id)
        if similar:
            rec.meta["similar_image"] = image_path(file.parent, str(similar), LAYOUT, rec.id)
        yield rec
