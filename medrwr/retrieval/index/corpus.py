"""Corpus ingestion: the :class:`Document` model, streaming readers for JSONL / TSV / CSV / parquet
(optionally gzipped), column-mapping presets for the formats users already have, and chunking.

Readers are generators: a 5 GB corpus is read record by record (JSONL line by line, TSV/CSV row
by row, parquet in row batches), never loaded whole.

>>> import io, json, tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "kb.jsonl")
>>> _ = open(p, "w").write(json.dumps({"id": "1", "title": "Asthma", "content": "Airway disease."}) + "\\n")
>>> [d.doc_id for d in read_corpus(p)], next(read_corpus(p)).text
(['1'], 'Airway disease.')
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from medrwr.errors import CorpusError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Document:
    """One passage. ``source`` names the corpus it came from (shown as ``Hit.source``)."""

    doc_id: str
    title: str
    text: str
    source: str = ""
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ColumnMapping:
    """Which record fields make a :class:`Document`.

    ``id`` and ``text`` list candidate column names: the first present (and, for text, non-empty)
    one wins. No id column -> ids are the record's row number (0-based, stable for a given file).
    ``split_title`` splits the text at its first newline into title and text (FlashRAG's
    ``contents = "title\\ntext"``). ``metadata=None`` keeps every other column as metadata.
    """

    id: tuple[str, ...] = ("id",)
    text: tuple[str, ...] = ("text",)
    title: str | None = "title"
    split_title: bool = False
    source: str | None = None
    metadata: tuple[str, ...] | None = None


_IDS = ("id", "_id", "doc_id", "docid")
PRESETS: dict[str, ColumnMapping] = {
    # MedRAG corpora (textbooks, statpearls, pubmed, wikipedia): {"id", "title", "content", "contents"}
    "medrag": ColumnMapping(id=_IDS, text=("content", "contents"), title="title"),
    # Med-RwR knowledge_base.tsv: id + text (or contents), no title
    "medrwr": ColumnMapping(id=_IDS, text=("text", "contents"), title="title"),
    # FlashRAG / Search-R1 JSONL: {"id", "contents": "\"Title\"\ntext"}
    "flashrag": ColumnMapping(id=_IDS, text=("contents",), title=None, split_title=True),
    # Our own plain layout: id, title, text
    "plain": ColumnMapping(id=_IDS, text=("text",), title="title"),
}


def detect_preset(columns: Iterable[str]) -> str:
    """Guess the preset from a header or the first record's keys."""
    cols = set(columns)
    if "content" in cols:
        return "medrag"
    if "contents" in cols and "text" not in cols:
        return "medrag" if "title" in cols else "flashrag"
    if "text" in cols:
        return "plain" if "title" in cols else "medrwr"
    raise CorpusError(
        f"cannot detect the corpus layout from its columns {sorted(cols)}: expected 'content' (MedRAG), "
        "'contents' (FlashRAG) or 'text' (Med-RwR / plain). "
        "Pass --preset or --text-column NAME (in Python: preset=..., text_column=...)"
    )


# ------------------------------------------------------------------------------------------ readers


def _format_of(path: Path) -> tuple[str, bool]:
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    for ext, fmt in (
        (".jsonl", "jsonl"),
        (".ndjson", "jsonl"),
        (".json", "jsonl"),
        (".tsv", "tsv"),
        (".tab", "tsv"),
        (".csv", "csv"),
        (".parquet", "parquet"),
        (".pq", "parquet"),
    ):
        if name.endswith(ext):
            return fmt, gz
    raise CorpusError(f"{path}: unknown corpus format; use .jsonl, .tsv, .csv or .parquet (optionally .gz)")


def is_corpus_file(path: str | os.PathLike) -> bool:
    """True when :func:`iter_records` can read ``path`` by its name (gzipped parquet is not readable)."""
    try:
        fmt, gz = _format_of(Path(path))
    except CorpusError:
        return False
    return not (gz and fmt == "parquet")


def _default_source(path: Path) -> str:
    name = path.name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return name.rsplit(".", 1)[0] if "." in name else name


_SNIFF_BYTES = 8192
_MAGIC = ((b"\x1f\x8b", "a gzip file: name it with a .gz suffix"), (b"PAR1", "a parquet file: name it .parquet"),
          (b"PK\x03\x04", "a zip archive (an .xlsx workbook?): export it as CSV"),
          (b"%PDF", "a PDF document"))


def _not_text(path: Path, lineno: int, raw: bytes, exc: UnicodeDecodeError | None) -> CorpusError:
    where = f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1}" if exc is not None else "a NUL byte"
    return CorpusError(
        f"{path}:{lineno}: not UTF-8 text ({where}); a corpus file must be UTF-8 JSON Lines, TSV or CSV. "
        "If this is a binary file, point --corpus at the text corpus; if it is text in another encoding, "
        "convert it (e.g. `iconv -f latin1 -t utf-8`)"
    )


def _open_binary(path: Path, gz: bool) -> Any:
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _text_lines(path: Path, gz: bool) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` pairs, decoded as UTF-8 one line at a time so an error names its line.

    The first 8 KiB are checked first: a binary file is refused before a newline-free blob is read whole.
    """
    lineno = 0
    try:
        with _open_binary(path, gz) as f:
            head = f.peek(_SNIFF_BYTES)[:_SNIFF_BYTES] if hasattr(f, "peek") else b""
            for magic, what in _MAGIC:
                if head.startswith(magic):
                    raise CorpusError(f"{path}:1: this is not a text corpus, it is {what}")
            if b"\x00" in head:
                raise _not_text(path, head[: head.index(b"\x00")].count(b"\n") + 1, head, None)
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _not_text(path, lineno, raw, exc) from None
                yield lineno, (line.lstrip("\ufeff") if lineno == 1 else line)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile, a truncated .gz, a read error
        kind = "gzip-compressed " if gz else ""
        raise CorpusError(f"{path}:{lineno + 1}: cannot read this {kind}file ({exc})") from None


def _json_error(path: Path, lineno: int, line: str, exc: json.JSONDecodeError) -> CorpusError:
    a = max(exc.pos - 30, 0)
    near = line[a : exc.pos + 30].rstrip("\r\n")
    hint = (
        " (a JSON array file must be converted to JSON Lines: one object per line)"
        if (lineno == 1 and line.lstrip().startswith("["))
        else ""
    )
    return CorpusError(
        f"{path}:{lineno}: not valid JSON: {exc.msg} at column {exc.colno}, near {near!r}{hint}"
    )


def _iter_jsonl(path: Path, gz: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, line in _text_lines(path, gz):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _json_error(path, lineno, line, exc) from None
        except RecursionError:
            raise CorpusError(f"{path}:{lineno}: not valid JSON: nested too deeply") from None
        if not isinstance(rec, dict):
            hint = (
                " (a JSON array file must be converted to JSON Lines: one object per line)"
                if (isinstance(rec, list))
                else ""
            )
            raise CorpusError(
                f"{path}:{lineno}: expected a JSON object per line, got {type(rec).__name__}{hint}"
            )
        yield lineno, rec


def _raise_csv_limit() -> None:
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def _multiline(path: Path, first: int, last: int, what: str) -> CorpusError:
    return CorpusError(
        f"{path}:{first}: {what} runs over lines {first}-{last}: a quote is not closed, or a quoted field "
        "holds line breaks. Fix the quoting; if the fields really contain line breaks, pass "
        "--allow-multiline-csv (allow_multiline=True)"
    )


def _iter_delimited(
    path: Path, gz: bool, delimiter: str, allow_multiline: bool = False
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows as dicts. A record spanning several lines is an error unless ``allow_multiline``: an
    unclosed quote otherwise swallows every later row into one field, silently."""
    _raise_csv_limit()
    reader = csv.reader((line for _, line in _text_lines(path, gz)), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise CorpusError(f"{path}:1: cannot parse the header ({exc})") from None
    if reader.line_num > 1 and not allow_multiline:
        raise _multiline(path, 1, reader.line_num, "the header")
    header = [h.strip().lstrip("\ufeff") for h in header]
    while True:
        first = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise CorpusError(f"{path}:{reader.line_num}: malformed row ({exc})") from None
        if not row:
            continue
        if reader.line_num > first and not allow_multiline:
            raise _multiline(path, first, reader.line_num, "this record")
        if len(row) != len(header):
            raise CorpusError(
                f"{path}:{first}: row has {len(row)} fields but the header has {len(header)} "
                f"({header}); check the delimiter and quoting of this line"
            )
        yield first, dict(zip(header, row))


def _iter_parquet(path: Path, batch_size: int = 4096) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is in the retrieval extra
        raise ImportError("reading parquet needs pyarrow: pip install 'medrwr[retrieval]'") from exc
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError
        raise CorpusError(f"{path}: not a readable parquet file ({exc})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


def iter_records(path: str | os.PathLike, allow_multiline: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream ``(line_or_row_number, record)`` pairs from a JSONL/TSV/CSV/parquet file.

    A TSV/CSV record over several lines is an error unless ``allow_multiline`` (see :func:`read_corpus`).
    """
    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"corpus file {p} does not exist")
    fmt, gz = _format_of(p)
    if fmt == "jsonl":
        return _iter_jsonl(p, gz)
    if fmt in ("tsv", "csv"):
        return _iter_delimited(p, gz, "\t" if fmt == "tsv" else ",", allow_multiline)
    if gz:
        raise CorpusError(f"{p}: gzipped parquet is not supported; parquet is compressed already")
    return _iter_parquet(p)


def _first(rec: dict[str, Any], names: Sequence[str], need_value: bool) -> tuple[str | None, Any]:
    for n in names:
        if n in rec and rec[n] is not None:
            v = rec[n]
            if need_value and isinstance(v, str) and not v.strip():
                continue
            return n, v
    return None, None


def _split_title(contents: str) -> tuple[str, str]:
    head, sep, rest = contents.partition("\n")
    if not sep:
        return "", contents.strip()
    title = head.strip()
    if len(title) >= 2 and title[0] == title[-1] == '"':
        title = title[1:-1]
    return title, rest.strip()


def _to_document(rec: dict[str, Any], mapping: ColumnMapping, row: int, where: str, source: str) -> Document:
    id_col, doc_id = _first(rec, mapping.id, need_value=False)
    if id_col is None:
        doc_id = str(row)
    text_col, text = _first(rec, mapping.text, need_value=True)
    if text_col is None:
        present = [c for c in mapping.text if c in rec]
        if present:
            text = ""
            text_col = present[0]
        else:
            raise CorpusError(
                f"{where}: no text column: looked for {list(mapping.text)}, the record has {sorted(rec)}. "
                "Pick a preset (--preset medrag|medrwr|flashrag|plain) or name the column (--text-column NAME)"
            )
    text = "" if text is None else str(text)
    title = ""
    if mapping.split_title:
        title, text = _split_title(text)
    elif mapping.title and rec.get(mapping.title) is not None:
        title = str(rec[mapping.title]).strip()
    if mapping.source and rec.get(mapping.source):
        source = str(rec[mapping.source])
    used = {id_col, text_col, mapping.title, mapping.source} | set(mapping.text)
    if mapping.metadata is None:
        metadata = {k: v for k, v in rec.items() if k not in used and v is not None}
    else:
        metadata = {k: rec[k] for k in mapping.metadata if k in rec}
    return Document(doc_id=str(doc_id), title=title, text=text.strip(), source=source, metadata=metadata)


def read_corpus(
    path: str | os.PathLike,
    preset: str = "auto",
    columns: ColumnMapping | None = None,
    source: str | None = None,
    *,
    text_column: str | None = None,
    title_column: str | None = None,
    id_column: str | None = None,
    allow_multiline: bool = False,
) -> Iterator[Document]:
    """Stream :class:`Document`s from a JSONL / TSV / CSV / parquet file (``.gz`` for text formats).

    ``preset``: ``auto`` (detect from the header / first record), ``medrag``, ``medrwr``,
    ``flashrag`` or ``plain`` (see :data:`PRESETS`); ``columns`` overrides it, and ``text_column``
    / ``title_column`` / ``id_column`` override single columns of either (``medrwr index build
    --text-column ...``); a named column missing from the first record is an error. ``source``
    names the corpus on every document (default: the file name without extensions).

    Bad input raises :class:`CorpusError` naming ``file:line`` and the reason: bytes that are not
    UTF-8 (a binary file), invalid JSON (the parser's message, column and the text near it), a
    row with the wrong number of fields, and a TSV/CSV record spanning several lines (usually an
    unclosed quote that would swallow every later row) unless ``allow_multiline``.
    """
    p = Path(path)
    if columns is None and preset != "auto" and preset not in PRESETS:
        raise CorpusError(f"unknown corpus preset {preset!r}; choose auto, {', '.join(PRESETS)}")
    named = {"text": text_column, "title": title_column, "id": id_column}
    for what, col in named.items():
        if col is not None and not str(col).strip():
            raise CorpusError(f"the {what} column name is empty")
    # validate eagerly (missing file, unknown format) so errors surface at the call, not at first next()
    records = iter_records(p, allow_multiline=allow_multiline)
    return _documents(p, records, preset, columns, source if source is not None else _default_source(p), named)


def _documents(
    p: Path,
    records: Iterator[tuple[int, dict[str, Any]]],
    preset: str,
    columns: ColumnMapping | None,
    source: str,
    named: dict[str, str | None] | None = None,
) -> Iterator[Document]:
    named = {k: v for k, v in (named or {}).items() if v is not None}
    mapping = columns if columns is not None else (PRESETS[preset] if preset != "auto" else None)
    if mapping is None and "text" in named:
        mapping = PRESETS["plain"]  # the text column is named: nothing to detect
    for row, (line, rec) in enumerate(records):
        if row == 0:
            if mapping is None:
                try:
                    chosen = detect_preset(rec.keys())
                except CorpusError as exc:
                    raise CorpusError(f"{p}:{line}: {exc}") from None
                logger.info("corpus %s: detected preset %r from columns %s", p, chosen, sorted(rec))
                mapping = PRESETS[chosen]
            mapping = _with_named_columns(mapping, named, rec, f"{p}:{line}")
        yield _to_document(rec, mapping, row, f"{p}:{line}", source)


def _with_named_columns(mapping: ColumnMapping, named: dict[str, str], rec: dict[str, Any], where: str) -> ColumnMapping:
    """``mapping`` with the user's named columns, each checked against the first record's columns."""
    for what, col in named.items():
        if col not in rec:
            raise CorpusError(
                f"{where}: the {what} column {col!r} (--{what}-column) is not in the corpus; its columns are "
                f"{sorted(rec)}"
            )
    changes: dict[str, Any] = {}
    if "text" in named:
        changes["text"] = (named["text"],)
    if "title" in named:
        changes.update(title=named["title"], split_title=False)
    if "id" in named:
        changes["id"] = (named["id"],)
    return replace(mapping, **changes) if changes else mapping


# ------------------------------------------------------------------------------------------ chunking


def _windows(n: int, size: int, overlap: int) -> Iterator[tuple[int, int]]:
    step = size - overlap
    start = 0
    while True:
        end = min(start + size, n)
        yield start, end
        if end >= n:
            return
        start += step


def chunk_documents(
    docs: Iterable[Document],
    size: int,
    overlap: int = 0,
    unit: Literal["words", "tokens"] = "words",
    tokenizer: Any = None,
) -> Iterator[Document]:
    """Split documents into windows of ``size`` words (or tokenizer tokens) overlapping by ``overlap``.

    Chunk ``i`` of document ``d`` gets id ``f"{d}#{i}"`` and metadata ``parent_id`` / ``chunk``;
    the title is kept on every chunk. ``size=0`` passes documents through unchanged. ``tokenizer``
    (for ``unit="tokens"``) needs ``encode(text, add_special_tokens=False)`` and ``decode(ids)``,
    e.g. a Hugging Face tokenizer.
    """
    if size < 0:
        raise ValueError(f"chunk size must be >= 0 (0 keeps documents whole), got {size}")
    if size and not 0 <= overlap < size:
        raise ValueError(f"chunk overlap must be in [0, size={size}), got {overlap}")
    if unit not in ("words", "tokens"):
        raise ValueError(f"chunk unit must be 'words' or 'tokens', got {unit!r}")
    if unit == "tokens" and size and tokenizer is None:
        raise ValueError("chunking by tokens needs a tokenizer (encode/decode); or use unit='words'")
    for doc in docs:
        if size == 0:
            yield doc
            continue
        if unit == "words":
            pieces: list[Any] = doc.text.split()
        else:
            try:
                pieces = list(tokenizer.encode(doc.text, add_special_tokens=False))
            except TypeError:
                pieces = list(tokenizer.encode(doc.text))
        for i, (a, b) in enumerate(_windows(len(pieces), size, overlap)):
            part = pieces[a:b]
            text = " ".join(part) if unit == "words" else tokenizer.decode(part).strip()
            meta = dict(doc.metadata)
            meta.update(parent_id=doc.doc_id, chunk=i)
            yield replace(doc, doc_id=f"{doc.doc_id}#{i}", text=text, metadata=meta)


__all__ = [
    "PRESETS",
    "ColumnMapping",
    "CorpusError",
    "Document",
    "chunk_documents",
    "detect_preset",
    "is_corpus_file",
    "iter_records",
    "read_corpus",
]
