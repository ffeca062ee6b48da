"""Generic local MCQ / VQA file: one JSON object per line (``.jsonl``) or one JSON list (``.json``).

Each item needs ``question`` and ``answer`` (``label`` and ``gt_answer`` are accepted too). Optional:
``id`` (default: the line number), ``options`` (``{letter: text}`` or a list; without it, choices written into
the question as ``A. …`` lines or ``Answer Choices: (A) …`` are used), ``images`` (list) or ``image`` (one path),
relative to the file's folder, ``answer_type`` (``mcq``/``closed``/``open``; derived when absent), ``lang``,
``meta`` (dict), and ``modality`` / ``question_type`` / ``subject``; other keys are kept in ``meta``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medrwr.eval.datasets._common import (
    Layout,
    as_str,
    gold_letter,
    image_path,
    inline_options,
    is_yes_no_answer,
    iter_json_list,
    iter_jsonl,
    options_from_list,
)
from medrwr.eval.record import EvalRecord

__all__ = ["DEFAULT_SPLIT", "LAYOUT", "iter_items", "parse_item", "records", "resolve_file"]

LAYOUT = Layout(
    "jsonl",
    "a .jsonl/.json file, or a folder holding <split>.jsonl, with question, answer, options?, images?, id? per item",
    "your own data (see docs/evaluation-scoring.md for the schema)",
)
DEFAULT_SPLIT = "test"

_CORE = {"id", "question", "answer", "label", "gt_answer", "options", "images", "image", "answer_type", "lang", "meta"}
_TYPES = {"mcq": "mcq", "closed": "closed", "open": "open", "yes/no": "closed", "multiple-choice": "mcq"}


def resolve_file(path: Path, split: str, layout: Layout) -> Path:
    """The file itself, or ``<dir>/<split>.jsonl`` / ``<split>.json`` (or the folder's only .jsonl file)."""
    if path.is_file():
        if path.suffix.lower() not in (".jsonl", ".json"):
            raise layout.error(f"{path} is not a .jsonl or .json file")
        return path
    if not path.is_dir():
        raise layout.error(f"{path} does not exist")
    for name in (f"{split}.jsonl", f"{split}.json"):
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.jsonl"))
    if len(found) == 1:
        return found[0]
    listed = ", ".join(p.name for p in found) or "no .jsonl files"
    raise layout.error(f"{path} has no {split}.jsonl (found: {listed})")


def iter_items(file: Path, layout: Layout) -> Iterator[tuple[int, dict[str, Any]]]:
    if file.suffix.lower() == ".json":
        return enumerate(iter_json_list(file, layout), 1)
    return iter_jsonl(file, layout)


def records(path: Path, split: str) -> Iterator[EvalRecord]:
    file = resolve_file(path, split, LAYOUT)
    return _records(file, split, "jsonl", LAYOUT)


def _records(file: Path, split: str, benchmark: str, layout: Layout) -> Iterator[EvalRecord]:
    seen: set[str] = set()
    for n, obj in iter_items(file, layout):
        rec = parse_item(obj, benchmark=benchmark, split=split, base=file.parent, layout=layout, where=f"{file}:{n}")
        if rec.id in seen:
            raise layout.error(f"{file}:{n}: duplicate id {rec.id!r} (ids must be unique: results are keyed by id)")
        seen.add(rec.id)
        yield rec


def parse_item(
    obj: dict[str, Any], *, benchmark: str, split: str, base: Path, layout: Layout, where: str
) -> EvalRecord:
    """One generic item → EvalRecord (shared with the ECBench loader)."""
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise layout.error(f"{where}: item has no 'question' string")
    gold = next((obj[k] for k in ("answer", "label", "gt_answer") if obj.get(k) not in (None, "")), None)
    if gold is None:
        raise layout.error(f"{where}: item has no 'answer'")
    item_id = as_str(obj.get("id")) or where.rsplit(":", 1)[-1]

    raw_opts = obj.get("options")
    stem = question
    if isinstance(raw_opts, dict) and raw_opts:
        options = {str(k).strip().upper()[:1]: str(v).strip() for k, v in raw_opts.items()}
    elif isinstance(raw_opts, list) and raw_opts:
        options = options_from_list(raw_opts)
    else:
        stem, options = inline_options(question)

    declared = _TYPES.get(as_str(obj.get("answer_type")).lower())
    if options and declared in (None, "mcq"):
        letter = gold_letter(gold, options)
        if letter is None:
            raise layout.error(f"{where}: answer {gold!r} is neither an option letter nor an option's text")
        answer, answer_type, yes_no = letter, "mcq", False
    else:
        options = None
        stem = question
        answer = as_str(gold)
        yes_no = is_yes_no_answer(answer)
        answer_type = declared if declared in ("closed", "open") else ("closed" if yes_no else "open")

    imgs = obj.get("images", obj.get("image"))
    if imgs in (None, ""):
        imgs = []
    elif isinstance(imgs, str):
        imgs = [imgs]
    images = [image_path(base, str(p), layout, item_id) for p in imgs]

    meta: dict[str, Any] = dict(obj.get("meta") or {})
    for key, value in obj.items():
        if key not in _CORE:
            meta.setdefault(key, value)
    if stem != question:
        meta.setdefault("question_raw", question)
    return EvalRecord(
        id=item_id,
        benchmark=benchmark,
        split=split,
        question=stem,
        images=images,
        options=options,
        answer=answer,
        answer_type=answer_type,
        is_yes_no=yes_no,
        lang=as_str(obj.get("lang")) or "en",
        meta=meta,
    )
