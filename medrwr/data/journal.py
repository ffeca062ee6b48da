"""Append-only JSONL journals: how every synthesis stage survives ``kill -9``.

A stage appends one JSON line per finished item (``{"id": ...}``), flushed and fsynced, so a crash loses at
most the item being written. Reopening drops a torn last line (cut mid-write) and reports the ids already done;
the stage skips them. When every item is done the stage writes its inspectable output file *atomically* in a
fixed order (the input order), so an interrupted-and-resumed run ends with the same bytes as an uninterrupted one.

>>> import tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "j.jsonl")
>>> with Journal(p) as j:
...     j.append({"id": "b", "x": 1}); j.append({"id": "a", "x": 2})
>>> with open(p, "a") as f:
...     _ = f.write('{"id": "c", "x"')   # a torn line left by kill -9
>>> j = Journal(p); sorted(j.done), j.dropped_bytes > 0
(['a', 'b'], True)
>>> j.close()
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medrwr.errors import SynthesisError

__all__ = ["Journal", "read_jsonl", "write_jsonl_atomic"]


class Journal:
    """One stage's append-only record file. ``done`` maps id -> the record written for it (last one wins)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict[str, Any]] = {}
        self.dropped_bytes = 0
        self._repair_and_read()
        self._f = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def _repair_and_read(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        keep = raw.rfind(b"\n") + 1  # a line without its newline was cut mid-write
        if keep < len(raw):
            self.dropped_bytes = len(raw) - keep
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        for i, line in enumerate(raw[:keep].decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise SynthesisError(f"{self.path}:{i} is not JSON; delete the file to redo this stage") from None
            self.done[str(rec["id"])] = rec

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably (flush + fsync) and remember it as done. Thread-safe."""
        line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())
            self.done[str(record["id"])] = record

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every JSON line of ``path`` (a stage output); a bad line is a :class:`SynthesisError` naming it."""
    p = Path(path)
    out = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SynthesisError(f"{p}:{i}: not valid JSON ({exc.msg}); one JSON object per line") from None
    return out


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` (sorted keys, one per line) through a temp file, fsync and ``os.replace``; returns the count."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n
