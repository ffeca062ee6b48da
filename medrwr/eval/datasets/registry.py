"""The benchmark names, :func:`load` and :func:`describe`: one table from name to loader module, so the CLI,
the runner and the docs list the same benchmarks.

Each loader module has ``LAYOUT`` (a :class:`~medrwr.eval.datasets._common.Layout`), ``DEFAULT_SPLIT`` and
``records(path, split) -> Iterator[EvalRecord]``, which checks the layout *before* returning its iterator, so a
wrong path fails at once and items stream afterwards.
"""

from __future__ import annotations

import importlib
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from medrwr.errors import DatasetError
from medrwr.eval.record import EvalRecord

__all__ = ["NAMES", "describe", "iter_records", "layout_of", "load"]

NAMES: tuple[str, ...] = (
    "vqa_rad",
    "slake",
    "path_vqa",
    "pmc_vqa",
    "omnimedvqa",
    "mmmu",
    "medxpertqa",
    "ecbench",
    "jsonl",
)


def _module(name: str) -> ModuleType:
    key = str(name).strip().lower().replace("-", "_")
    if key not in NAMES:
        raise DatasetError(f"unknown benchmark {name!r}; choose one of: {', '.join(NAMES)}")
    return importlib.import_module(f"medrwr.eval.datasets.{key}")


def layout_of(name: str) -> str:
    """The expected layout and download source of a benchmark, as one line (for help texts and docs)."""
    lay = _module(name).LAYOUT
    return f"{lay.expected} (get it from {lay.source})"


def _languages(languages: str | Iterable[str] | None) -> set[str] | None:
    if languages is None:
        return None
    items = languages.split(",") if isinstance(languages, str) else list(languages)
    out = {str(x).strip().lower() for x in items if str(x).strip()}
    return out or None


def iter_records(
    name: str,
    path: str | Path,
    *,
    split: str | None = None,
    languages: str | Iterable[str] | None = None,
    limit: int | None = None,
) -> Iterator[EvalRecord]:
    """Stream a benchmark's items (the layout is checked before the first item is read)."""
    mod = _module(name)
    langs = _languages(languages)
    if path is None or str(path).strip() == "":
        raise mod.LAYOUT.error("no data path given")
    it: Iterator[EvalRecord] = _unique(mod.records(Path(path).expanduser(), split or mod.DEFAULT_SPLIT), mod)
    if langs is not None:
        it = (r for r in it if r.lang.lower() in langs)
    if limit is not None:
        if limit < 0:
            raise DatasetError(f"limit must be >= 0, got {limit}")
        it = itertools.islice(it, limit)
    return it


def _unique(records: Iterator[EvalRecord], mod: ModuleType) -> Iterator[EvalRecord]:
    """Results are keyed by item id (resume, reports), so two items with one id would silently merge."""
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise mod.LAYOUT.error(f"two items share the id {r.id!r}; ids must be unique")
        seen.add(r.id)
        yield r


def load(
    name: str,
    path: str | Path,
    *,
    split: str | None = None,
    languages: str | Iterable[str] | None = None,
    limit: int | None = None,
) -> list[EvalRecord]:
    """Every item of benchmark ``name`` under ``path`` (local files only), in file order.

    ``split`` picks the file or split (each loader documents its default, e.g. ``test``, ``test_2`` for PMC-VQA,
    ``validation`` for MMMU); ``languages`` keeps only those ``lang`` values (``None``: every language in the
    file); ``limit`` stops after that many items. A missing or wrong-shaped path raises
    :class:`~medrwr.errors.DatasetError` naming the expected layout and where to get the data.
    """
    return list(iter_records(name, path, split=split, languages=languages, limit=limit))


def describe(records: Iterable[EvalRecord]) -> dict[str, Any]:
    """What a loader found: N, and N per bucket, answer type, language, split, modality, question type, subject."""
    n = 0
    counts: dict[str, Counter] = {
        k: Counter()
        for k in ("benchmark", "split", "bucket", "answer_type", "lang", "modality", "question_type", "subject")
    }
    images = Counter()
    options = Counter()
    for r in records:
        n += 1
        counts["benchmark"][r.benchmark] += 1
        counts["split"][r.split] += 1
        counts["bucket"][r.bucket] += 1
        counts["answer_type"][r.answer_type] += 1
        counts["lang"][r.lang] += 1
        for key in ("modality", "question_type", "subject"):
            value = r.meta.get(key)
            if value not in (None, ""):
                counts[key][str(value)] += 1
        images[len(r.images)] += 1
        if r.options:
            options[len(r.options)] += 1
    out: dict[str, Any] = {"n": n}
    for key, c in counts.items():
        out[f"by_{key}"] = dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
    out["by_image_count"] = {str(k): v for k, v in sorted(images.items())}
    out["by_option_count"] = {str(k): v for k, v in sorted(options.items())}
    return out
