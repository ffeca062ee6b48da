"""The on-disk index directory: what bm25s lacks (a manifest, checksums, versions, atomic renames).

An index is a directory::

    manifest.json        format version, corpus hash, encoder, doc count, build config, file checksums
    docs.jsonl           one JSON document per row (doc_id, title, text, source, metadata)
    doc_offsets.npy      int64 byte offsets into docs.jsonl (n + 1 entries): O(1) random access by row
    bm25/                the bm25s index (.npy arrays + JSON params/vocab)
    embeddings.npy       float32 (n, dim) passage embeddings (dense indexes only)
    dense.faiss          the FAISS index (FAISS's own binary format)

Nothing is pickled: arrays are ``.npy`` loaded with ``allow_pickle=False``, everything else is JSON.

Writes happen in a temporary directory beside the target, which is renamed over it only when the
build succeeded (:func:`atomic_index_dir`): a crash mid-build leaves the previous index intact.

Checksums. Every file gets its size and full sha256 at build time. Verifying a 1.5 GB embeddings
file in full takes seconds, so files larger than :data:`QUICK_VERIFY_LIMIT` also record the
sha256 of their first and last MiB (``sha256_ends``); ``load_manifest(verify=True)`` checks sizes
everywhere, full hashes of small files and the end-hashes of big ones. ``verify="full"`` (and
``medrwr index info --verify``) hashes everything.

Errors::

    IndexStoreError (ValueError)
     ├── IndexMissing           no directory, or no manifest.json in it
     ├── IndexCorrupt           manifest unreadable, a file missing, a size or checksum mismatch
     └── IndexVersionMismatch   written by an incompatible format version
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import mmap
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medrwr._io import sha256_file, write_json_atomic
from medrwr.errors import IndexCorrupt, IndexMissing, IndexStoreError, IndexVersionMismatch
from medrwr.retrieval.index.corpus import Document

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCS_FILE = "docs.jsonl"
OFFSETS_FILE = "doc_offsets.npy"
QUICK_VERIFY_LIMIT = 64 * 1024 * 1024
"""Files above this size are verified by size + sha256 of their first and last MiB on load."""
_END_BYTES = 1024 * 1024
_REBUILD = "rebuild it with `medrwr index build --corpus PATH --out DIR`"


def rebuild_advice(d: Path, manifest: dict[str, Any] | None = None) -> str:
    """What to do about a broken index at ``d``: the default KB (its manifest has ``kb_version``) is
    rebuilt from ``--corpus default`` or by deleting it; any other index from its own corpus."""
    if manifest and manifest.get("kb_version"):
        return (f"rebuild it with `medrwr index build --corpus default --out {d}`, or delete {d} "
                "and it is rebuilt on next use")
    return f"rebuild it with `medrwr index build --corpus PATH --out {d}` (PATH: the corpus it was built from)"


# ------------------------------------------------------------------------------------------ atomic dirs


@contextlib.contextmanager
def atomic_index_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``out_dir``; on success swap it in, on error delete it.

    The previous index stays in place until the build has finished. The swap is two renames
    (old -> ``.NAME.old-*``, temp -> NAME); the old copy is deleted afterwards. Refuses to replace
    a non-empty directory that is not an index, so ``--out ~`` cannot wipe a home directory.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise IndexStoreError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise IndexStoreError(
            f"{out} is a non-empty directory without {MANIFEST}; refusing to replace it. "
            "Choose an empty or new directory for the index."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{tag}"
    if out.exists():
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_temps(out: Path) -> None:
    """Delete temp dirs left by builds of ``out`` whose process is gone (killed mid-build)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name.rsplit(".tmp-", 1)[-1].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            logger.info("removing %s, left by an interrupted build", p)
            shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ checksums


def _sha256_ends(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_END_BYTES))
        if size > _END_BYTES:
            f.seek(max(size - _END_BYTES, _END_BYTES))
            h.update(f.read(_END_BYTES))
    return h.hexdigest()


def _checksum_entry(path: Path, sha256: str | None = None) -> dict[str, Any]:
    size = path.stat().st_size
    entry: dict[str, Any] = {"size": size, "sha256": sha256 or sha256_file(path)}
    if size > QUICK_VERIFY_LIMIT:
        entry["sha256_ends"] = _sha256_ends(path, size)
    return entry


def _index_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    )


RESERVED_KEYS = frozenset({"format_version", "created_at", "medrwr_version", "files", "checksum_policy"})
"""Manifest keys that :func:`write_manifest` sets itself."""


def write_manifest(
    directory: str | os.PathLike, manifest: dict[str, Any], known_sha256: dict[str, str] | None = None
) -> dict[str, Any]:
    """Write ``manifest.json`` with the format version, a timestamp and a checksum of every file.

    ``known_sha256`` maps relative paths to digests computed while writing them (the document store hashes
    its bytes as it streams them), so a multi-GB file is not read back just to hash it again.
    """
    d = Path(directory)
    from medrwr import __version__

    full = dict(manifest)
    full["format_version"] = FORMAT_VERSION
    full["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    full["medrwr_version"] = __version__
    known = known_sha256 or {}
    full["files"] = {
        (rel := p.relative_to(d).as_posix()): _checksum_entry(p, known.get(rel)) for p in _index_files(d)
    }
    full["checksum_policy"] = {
        "quick_verify_limit_bytes": QUICK_VERIFY_LIMIT,
        "large_files": "size + sha256 of the first and last MiB on load; full sha256 with verify='full'",
    }
    write_json_atomic(d / MANIFEST, full)
    return full


def _orphan_hint(d: Path) -> str:
    olds = sorted(d.parent.glob(f".{d.name}.old-*")) if d.parent.is_dir() else []
    if olds:
        return (
            f" A build was interrupted while swapping directories; the previous index is at {olds[-1]} — "
            f"rename it to {d} to use it again."
        )
    return ""


def load_manifest(directory: str | os.PathLike, verify: bool | Literal["full"] = True) -> dict[str, Any]:
    """Read ``manifest.json`` and check the format version and (unless ``verify=False``) every file.

    ``verify=True`` checks sizes, full sha256 of files up to :data:`QUICK_VERIFY_LIMIT` and the
    first/last-MiB sha256 of bigger ones; ``verify="full"`` hashes every byte.
    """
    d = Path(directory).expanduser()
    if not d.exists():
        raise IndexMissing(
            f"index directory {d} does not exist; build one with `medrwr index build --corpus PATH --out {d}` "
            f"(or drop --index to search the shipped knowledge base).{_orphan_hint(d.absolute())}"
        )
    if not d.is_dir():
        raise IndexMissing(f"{d} is not a directory; an index is a directory with {MANIFEST}")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise IndexMissing(f"{d} is not an index: it has no {MANIFEST}; {rebuild_advice(d)}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexCorrupt(f"{mpath} is not valid JSON ({exc}); the index is corrupt, {rebuild_advice(d)}") from None
    if not isinstance(manifest, dict):
        raise IndexCorrupt(f"{mpath} must hold a JSON object; the index is corrupt, {rebuild_advice(d)}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexVersionMismatch(
            f"index {d} has format version {version!r} but this medrwr reads version {FORMAT_VERSION}; "
            f"{rebuild_advice(d, manifest)} (or install the medrwr version that wrote it: {manifest.get('medrwr_version', '?')})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise IndexCorrupt(f"{mpath} has no 'files' table of checksums; the index is corrupt, {rebuild_advice(d, manifest)}")
    if verify:
        _verify_files(d, files, full=(verify == "full"), advice=rebuild_advice(d, manifest))
    return manifest


def _verify_files(d: Path, files: dict[str, Any], full: bool, advice: str = _REBUILD) -> None:
    for rel, entry in files.items():
        p = d / rel
        if not p.is_file():
            raise IndexCorrupt(f"index {d} is missing file {rel}; the index is incomplete, {advice}")
        size = p.stat().st_size
        if size != entry.get("size"):
            raise IndexCorrupt(
                f"checksum error in {p}: size {size} bytes, manifest says {entry.get('size')}; "
                f"the file was modified or truncated, {advice}"
            )
        if full or "sha256_ends" not in entry:
            ok = sha256_file(p) == entry.get("sha256")
        else:
            ok = _sha256_ends(p, size) == entry["sha256_ends"]
        if not ok:
            raise IndexCorrupt(
                f"checksum error in {p}: its sha256 does not match {MANIFEST}; "
                f"the file was modified or corrupted, {advice}"
            )


# ------------------------------------------------------------------------------------------ documents


def _doc_to_json(doc: Document) -> dict[str, Any]:
    out: dict[str, Any] = {"doc_id": doc.doc_id, "title": doc.title, "text": doc.text, "source": doc.source}
    if doc.metadata:
        out["metadata"] = doc.metadata
    return out


class DocStoreWriter:
    """Append documents to ``docs.jsonl`` and record byte offsets; hashes the bytes as it goes.

    Offsets are spilled to a small ``.npy`` at :meth:`close`; they are 8 bytes per document, so a
    million passages cost 8 MB of RAM while building.
    """

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self._f = open(self.dir / DOCS_FILE, "wb")
        self._offsets = [0]
        self._hash = hashlib.sha256()
        self._sources: dict[str, int] = {}

    def add(self, doc: Document) -> int:
        line = (json.dumps(_doc_to_json(doc), ensure_ascii=False, default=str) + "\n").encode("utf-8")
        self._f.write(line)
        self._hash.update(line)
        self._offsets.append(self._offsets[-1] + len(line))
        self._sources[doc.source] = self._sources.get(doc.source, 0) + 1
        return len(self._offsets) - 2

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @property
    def corpus_sha256(self) -> str:
        return self._hash.hexdigest()

    @property
    def sources(self) -> dict[str, int]:
        return dict(self._sources)

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        np.save(self.dir / OFFSETS_FILE, np.asarray(self._offsets, dtype=np.int64), allow_pickle=False)


class DocStore:
    """Read-only random access to the documents of an index without loading them into RAM.

    ``docs.jsonl`` is memory-mapped and offsets are a memory-mapped ``.npy``; fetching row ``i`` is
    one slice and one ``json.loads``.
    """

    def __init__(self, directory: str | os.PathLike):
        d = Path(directory)
        self.offsets = np.load(d / OFFSETS_FILE, mmap_mode="r", allow_pickle=False)
        self._file = open(d / DOCS_FILE, "rb")
        size = os.fstat(self._file.fileno()).st_size
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        if int(self.offsets[-1]) != size:
            raise IndexCorrupt(
                f"{d / OFFSETS_FILE} does not match {d / DOCS_FILE} (offsets end at {int(self.offsets[-1])}, "
                f"file has {size} bytes); {_REBUILD}"
            )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def raw(self, row: int) -> dict[str, Any]:
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        assert self._mm is not None
        return json.loads(self._mm[start:end])

    def get(self, row: int) -> Document:
        if not 0 <= row < len(self):
            raise IndexError(f"document row {row} out of range (index has {len(self)} documents)")
        d = self.raw(row)
        return Document(
            doc_id=d["doc_id"],
            title=d.get("title", ""),
            text=d.get("text", ""),
            source=d.get("source", ""),
            metadata=d.get("metadata") or {},
        )

    def get_many(self, rows: Sequence[int]) -> list[Document]:
        return [self.get(int(r)) for r in rows]

    def __iter__(self) -> Iterator[Document]:
        """Stream every document in row order (sequential reads of the mapped file)."""
        for i in range(len(self)):
            yield self.get(i)

    def iter_texts(self, fmt: Callable[[dict], str] | None = None) -> Iterable[str]:
        for i in range(len(self)):
            d = self.raw(i)
            yield fmt(d) if fmt else d.get("text", "")

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self._file.close()


__all__ = [
    "DOCS_FILE",
    "FORMAT_VERSION",
    "MANIFEST",
    "OFFSETS_FILE",
    "QUICK_VERIFY_LIMIT",
    "DocStore",
    "DocStoreWriter",
    "IndexCorrupt",
    "IndexMissing",
    "IndexStoreError",
    "IndexVersionMismatch",
    "atomic_index_dir",
    "load_manifest",
    "write_json_atomic",
    "write_manifest",
]
