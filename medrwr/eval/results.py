"""``RUN_DIR/results.jsonl``: the append-only store of finished items, and ``run.json``, the run's identity.

One JSON object per line, each with the item's ``id`` and ``mode``. A batch is written with one ``write`` and
made durable with ``flush`` + ``fsync`` before the next batch starts, so after Ctrl-C or ``kill -9`` the file
holds whole batches plus, at worst, one torn last line. On reopening:

* a last line without its newline that does not parse is the torn write of an interrupted run: it is cut off
  (with a warning naming the line) and its items run again;
* any other line that does not parse is corruption: :class:`ResultsCorrupt` names the file and line, and
  nothing is run or overwritten until the user fixes or removes it;
* an ``(id, mode)`` pair seen twice is kept once (the first), with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from medrwr.errors import EvalRunError, ResultsCorrupt

logger = logging.getLogger(__name__)

__all__ = ["RESULTS", "RUN_JSON", "ResultStore", "ResultsCorrupt", "read_results"]

RESULTS = "results.jsonl"
RUN_JSON = "run.json"


def _scan(path: Path, *, repair: bool) -> tuple[list[dict[str, Any]], int | None]:
    """The parsed lines of ``path`` and, when its last line is torn, the byte offset where the good part ends."""
    rows: list[dict[str, Any]] = []
    data = path.read_bytes()
    pos = 0
    lineno = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        complete = end >= 0
        chunk = data[pos : end if complete else len(data)]
        lineno += 1
        if chunk.strip():
            try:
                obj = json.loads(chunk.decode("utf-8"))
                if not isinstance(obj, dict) or "id" not in obj or "mode" not in obj:
                    raise ValueError("not an object with 'id' and 'mode'")
            except (ValueError, UnicodeDecodeError) as exc:
                if not complete:  # the torn last write of an interrupted run
                    if repair:
                        logger.warning("%s: line %d is an incomplete write from an interrupted run; "
                                       "dropping it (its item runs again)", path, lineno)
                    return rows, pos
                raise ResultsCorrupt(
                    f"{path} line {lineno} is not a valid result ({type(exc).__name__}: {str(exc)[:80]}); "
                    "fix or delete that line, then run again (or --force to start the run over)"
                ) from None
            rows.append(obj)
        if not complete:
            break
        pos = end + 1
    return rows, None


def read_results(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every stored result of a run (a torn last line is skipped with a warning; corruption raises)."""
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise EvalRunError(f"{path} does not exist: is {run_dir} a run directory of `medrwr eval run`?")
    rows, _ = _scan(path, repair=True)
    return _dedupe(rows, path)


def _dedupe(rows: Iterable[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    seen: set[tuple[str, str]] = set()
    out = []
    for r in rows:
        key = (str(r["id"]), str(r["mode"]))
        if key in seen:
            logger.warning("%s: item %s in mode %s appears more than once; keeping the first", path, *key)
            continue
        seen.add(key)
        out.append(r)
    return out


class ResultStore:
    """Append-only results of one run directory, with the set of finished ``(id, mode)`` pairs."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RESULTS
        self.rows: list[dict[str, Any]] = []
        self.done: set[tuple[str, str]] = set()
        if self.path.is_file():
            rows, torn_at = _scan(self.path, repair=True)
            if torn_at is not None:
                with open(self.path, "r+b") as f:
                    f.truncate(torn_at)
                    f.flush()
                    os.fsync(f.fileno())
            self.rows = _dedupe(rows, self.path)
            self.done = {(str(r["id"]), str(r["mode"])) for r in self.rows}

    def has(self, item_id: str, mode: str) -> bool:
        return (str(item_id), mode) in self.done

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append a batch durably (one write, flush, fsync); rows already stored are skipped."""
        fresh = [r for r in rows if (str(r["id"]), str(r["mode"])) not in self.done]
        if not fresh:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        blob = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in fresh)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        self.rows.extend(fresh)
        self.done.update((str(r["id"]), str(r["mode"])) for r in fresh)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)
