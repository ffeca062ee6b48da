"""What every loader shares: the one-line layout error, gold-letter normalisation, streamed readers (JSON,
JSONL, CSV, parquet) and image references. Loaders stay short because the fiddly parts live here once."""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medrwr._imports import require
from medrwr.errors import DatasetError
from medrwr.protocol import OPTION_LETTERS

__all__ = [
    "LETTERS",
    "Layout",
    "clean_choice",
    "gold_letter",
    "is_yes_no_answer",
    "iter_csv",
    "iter_json_list",
    "iter_jsonl",
    "iter_parquet",
    "image_bytes",
    "options_from_list",
    "parquet_files",
]

LETTERS = OPTION_LETTERS
_EXTRA = "retrieval"  # the extra that ships pyarrow and pillow


@dataclass(frozen=True)
class Layout:
    """What a benchmark's folder must look like and where users get it: every loader error quotes both."""

    name: str
    expected: str
    source: str

    def error(self, problem: str) -> DatasetError:
        return DatasetError(f"{self.name}: {problem}; expected {self.expected} (get it from {self.source})")

    def require_dir(self, path: str | Path) -> Path:
        p = Path(path).expanduser()
        if not p.exists():
            raise self.error(f"{p} does not exist")
        return p


_PREFIX_RE = re.compile(r"^\s*\(?\s*([A-Ja-j])\s*(?:[:.)\]]|$)\s*(.*)$", re.DOTALL)
_JUNK = "\u00a0\u200a\u200b\ufeff \t\r\n\"'“”‘’"


def clean_choice(text: Any) -> str:
    """An option's text without stray quotes or odd spaces (the PMC-VQA CSVs carry ``\\xa0``, ``\\u200a``)."""
    return str(text).strip(_JUNK).replace("\u00a0", " ").replace("\u200a", " ").strip()


def split_prefixed_choice(text: str) -> tuple[str | None, str]:
    """``"A:Liver"`` → ``("A", "Liver")``; ``"Liver"`` → ``(None, "Liver")``."""
    t = clean_choice(text)
    m = _PREFIX_RE.match(t)
    if m and m.group(2).strip():
        return m.group(1).upper(), clean_choice(m.group(2))
    return None, t


def options_from_list(choices: Sequence[Any]) -> dict[str, str]:
    """``["A:Liver", "B:Lung"]`` or ``["Liver", "Lung"]`` → ``{"A": "Liver", "B": "Lung"}`` (letters in order)."""
    out: dict[str, str] = {}
    for letter, choice in zip(LETTERS, choices):
        prefix, text = split_prefixed_choice(str(choice))
        out[letter] = text if prefix in (None, letter) else clean_choice(choice)
    return out


def gold_letter(gold: Any, options: dict[str, str]) -> str | None:
    """The gold option letter: a bare letter, ``"B:text"`` / ``"B. text"`` / ``"(B)"``, or the text of exactly one
    option (case- and space-insensitive). None when nothing matches.

    >>> gold_letter("A:Liver", {"A": "Liver", "B": "Lung"}), gold_letter("b. Lung", {"A": "Liver", "B": "Lung"})
    ('A', 'B')
    >>> gold_letter(" lung ", {"A": "Liver", "B": "Lung"}), gold_letter("Heart", {"A": "Liver"}) is None
    ('B', True)
    """
    if gold is None:
        return None
    text = clean_choice(gold)
    if len(text) == 1 and text.upper() in options:
        return text.upper()
    m = _PREFIX_RE.match(text)
    if m and m.group(1).upper() in options:
        rest = clean_choice(m.group(2))
        if not rest or _same(rest, options[m.group(1).upper()]) or not any(_same(text, o) for o in options.values()):
            return m.group(1).upper()
    hits = [k for k, v in options.items() if _same(text, v)]
    return hits[0] if len(hits) == 1 else None


def _same(a: str, b: str) -> bool:
    return " ".join(a.casefold().split()) == " ".join(clean_choice(b).casefold().split())


_YES_NO = {"yes", "no", "是", "否"}


def is_yes_no_answer(answer: Any) -> bool:
    """True for a yes/no gold (MedEvalKit's closed definition; SLAKE's Chinese 是/否 included)."""
    return str(answer).strip().strip(".").lower() in _YES_NO


# --- streamed readers ---------------------------------------------------------------------------------


def iter_jsonl(path: Path, layout: Layout) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line; a line that is not a JSON object fails naming file and line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise layout.error(f"{path}:{n} is not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise layout.error(f"{path}:{n} is a JSON {type(obj).__name__}, not an object")
            yield n, obj


def iter_json_list(path: Path, layout: Layout) -> Iterator[dict[str, Any]]:
    """The objects of a JSON file holding one list of objects (SLAKE, OmniMedVQA, VQA-RAD OSF files)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise layout.error(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise layout.error(f"{path} holds a JSON {type(data).__name__}, not a list of items")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise layout.error(f"{path}: item {i} is a {type(item).__name__}, not an object")
        yield item


def iter_csv(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a CSV as dicts, read line by line (PMC-VQA's are tens of MB)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8-sig", newline="") as f:
        yield from csv.DictReader(f)


def parquet_files(root: Path, split: str) -> list[Path]:
    """``<root>/data/<split>-*.parquet`` (hash suffixes globbed), or ``<root>/<split>-*.parquet``."""
    for base in (root / "data", root):
        found = sorted(base.glob(f"{split}-*.parquet")) + sorted(base.glob(f"{split}.parquet"))
        if found:
            return found
    return []


def iter_parquet(files: Iterable[Path], columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Rows of parquet files as dicts, one record batch at a time."""
    pq = require("pyarrow.parquet", _EXTRA, "reading benchmark parquet files")
    for path in files:
        pf = pq.ParquetFile(str(path))
        names = set(pf.schema_arrow.names)
        cols = [c for c in columns if c in names] if columns else None
        for batch in pf.iter_batches(batch_size=256, columns=cols):
            yield from batch.to_pylist()


def parquet_columns(path: Path) -> list[str]:
    pq = require("pyarrow.parquet", _EXTRA, "reading benchmark parquet files")
    return list(pq.ParquetFile(str(path)).schema_arrow.names)


def image_bytes(cell: Any) -> bytes | None:
    """The encoded image of a Hugging Face ``Image`` cell (``{"bytes", "path"}``), raw bytes, or None."""
    if cell is None:
        return None
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, dict):
        data = cell.get("bytes")
        if data:
            return bytes(data)
        path = cell.get("path")
        if path and Path(path).is_file():
            return Path(path).read_bytes()
    return None


def image_path(root: Path, rel: str, layout: Layout, item: str) -> str:
    """The absolute path of an item's image, which must exist."""
    p = (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)
    if not p.is_file():
        raise layout.error(f"image {rel!r} of item {item} is missing under {root}")
    return str(p)


def as_str(value: Any) -> str:
    """A source cell as text (VQA-RAD has integer answers); None becomes ``""``."""
    return "" if value is None else str(value).strip()


_OPTION_LINE_RE = re.compile(r"^\s*\(?([A-J])\s*[.):]\s*(.+?)\s*$", re.MULTILINE)
_CHOICES_TAIL_RE = re.compile(r"\n?\s*Answer Choices:\s*(.*)$", re.DOTALL)
_INLINE_CHOICE_RE = re.compile(r"\(([A-J])\)\s*(.*?)(?=\s*\([A-J]\)\s|\s*\([A-J]\)$|$)", re.DOTALL)


def inline_options(question: str) -> tuple[str, dict[str, str] | None]:
    """Split choices written into a question: ``"...\\nAnswer Choices: (A) x (B) y"`` (MedXpertQA) or option
    lines ``A. x`` / ``(B) y`` / ``C: z``. Returns (stem, options) or (question, None) when there are none.

    >>> inline_options("Which?\\nAnswer Choices: (A) Liver (B) Lung")
    ('Which?', {'A': 'Liver', 'B': 'Lung'})
    >>> inline_options("Which?\\nA. Liver\\nB. Lung")
    ('Which?', {'A': 'Liver', 'B': 'Lung'})
    """
    m = _CHOICES_TAIL_RE.search(question)
    if m:
        found = {c.group(1): c.group(2).strip() for c in _INLINE_CHOICE_RE.finditer(m.group(1))}
        if _lettered(found):
            return question[: m.start()].rstrip(), found
    lines = list(_OPTION_LINE_RE.finditer(question))
    found = {}
    for line in lines:
        found.setdefault(line.group(1), line.group(2))
    if _lettered(found):
        stem = question[: lines[0].start()].rstrip()
        return stem, found
    return question, None


def _lettered(found: dict[str, str]) -> bool:
    return len(found) >= 2 and "".join(found) == LETTERS[: len(found)] and all(found.values())
