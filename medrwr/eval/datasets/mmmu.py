"""MMMU, Health & Medicine: the five subjects' parquet files, ``<root>/<Subject>/<split>-*.parquet``
(``MMMU/MMMU``; 150 validation items), or a merged ``<root>/data/<split>-*.parquet`` (``lmms-lab/MMMU``) filtered
to those subjects by id. ``split``: ``validation`` (default), ``dev``, or ``test`` (answers are hidden in the
parquet: put MMMU's ``answer_dict_test.json`` (or MedEvalKit's ``answer.json``) in ``<root>``). MMMU-Pro:
``split="pro10"`` / ``"pro4"`` read ``<root>/standard (10 options)/test-*.parquet`` (``(4 options)``).

``options`` is a stringified list, parsed with ``ast.literal_eval`` (never ``eval``). Every image present
(``image_1`` … ``image_7``) is kept, in order; MedEvalKit sends only ``image_1`` (``meta["medevalkit_images"]``).
An open item's gold may be a stringified list (``meta["gold_list"]``) or even a letter (``validation_Pharmacy_19``).
``meta``: ``subject``, ``question_type`` (``multiple-choice``/``open``), ``subfield``, ``img_type``.
"""

from __future__ import annotations

import ast
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medrwr.eval.datasets._common import LETTERS, Layout, as_str, image_bytes, iter_parquet, parquet_files
from medrwr.eval.record import EvalRecord

__all__ = ["DEFAULT_SPLIT", "LAYOUT", "SUBJECTS", "records"]

log = logging.getLogger(__name__)

LAYOUT = Layout(
    "mmmu",
    "<root>/<Subject>/validation-00000-of-00001.parquet for Basic_Medical_Science, Clinical_Medicine, "
    "Diagnostics_and_Laboratory_Medicine, Pharmacy, Public_Health (test: plus <root>/answer_dict_test.json)",
    "https://huggingface.co/datasets/MMMU/MMMU",
)
DEFAULT_SPLIT = "validation"
SUBJECTS = ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
            "Public_Health")
_PRO = {"pro10": "standard (10 options)", "pro4": "standard (4 options)"}
_ANSWER_FILES = ("answer_dict_test.json", "answer.json")


def records(path: Path, split: str) -> Iterator[EvalRecord]:
    root = LAYOUT.require_dir(path)
    if split in _PRO:
        files = sorted((root / _PRO[split]).glob("test-*.parquet"))
        if not files:
            raise LAYOUT.error(f"no '{_PRO[split]}/test-*.parquet' under {root}")
        return _records([(None, files)], split, None)
    groups = [(s, parquet_files(root / s, split)) for s in SUBJECTS if (root / s).is_dir()]
    groups = [(s, f) for s, f in groups if f]
    if not groups:
        merged = parquet_files(root, split)
        if not merged:
            raise LAYOUT.error(f"no {split} parquet for any Health & Medicine subject under {root}")
        groups = [(None, merged)]
    elif len(groups) < len(SUBJECTS):
        log.warning("mmmu: only %s found under %s", ", ".join(s for s, _ in groups), root)
    answers = _test_answers(root) if split == "test" else None
    return _records(groups, split, answers)


def _test_answers(root: Path) -> dict[str, Any]:
    for name in _ANSWER_FILES:
        if (root / name).is_file():
            data = json.loads((root / name).read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise LAYOUT.error(f"{root / name} is not a JSON object of id → answer")
            return data
    raise LAYOUT.error(f"test answers are hidden in the parquet and {' / '.join(_ANSWER_FILES)} is not in {root}")


def _subject_of(item_id: str) -> str | None:
    return next((s for s in SUBJECTS if f"_{s}_" in f"_{item_id}_"), None)


def _literal(text: Any, item_id: str) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise LAYOUT.error(f"item {item_id}: options {text[:60]!r} is not a Python list literal") from None


def _records(groups: list[tuple[str | None, list[Path]]], split: str,
             answers: dict[str, Any] | None) -> Iterator[EvalRecord]:
    for subject, files in groups:
        for row in iter_parquet(files):
            rid = as_str(row.get("id"))
            subj = subject or _subject_of(rid) or as_str(row.get("subject")).replace(" ", "_")
            if subj not in SUBJECTS:
                continue
            yield _record(row, rid, subj, split, answers)


def _record(row: dict[str, Any], rid: str, subject: str, split: str, answers: dict[str, Any] | None) -> EvalRecord:
    choices = _literal(row.get("options") or "[]", rid) or []
    qtype = as_str(row.get("question_type")) or ("multiple-choice" if choices else "open")
    gold: Any = row.get("answer")
    if answers is not None:
        if rid not in answers:
            raise LAYOUT.error(f"item {rid} has no entry in the test answer file")
        entry = answers[rid]
        gold = entry.get("ground_truth", entry.get("answer")) if isinstance(entry, dict) else entry
    gold_list = None
    if isinstance(gold, list):
        gold_list = [str(g) for g in gold]
    elif isinstance(gold, str) and gold.strip().startswith("["):
        try:
            parsed = ast.literal_eval(gold)
            gold_list = [str(g) for g in parsed] if isinstance(parsed, list) else None
        except (ValueError, SyntaxError):
            gold_list = None
    images = [b for b in (image_bytes(row.get(f"image_{k}")) for k in range(1, 8)) if b]
    if not images and row.get("image") is not None:
        images = [b for b in [image_bytes(row.get("image"))] if b]
    meta: dict[str, Any] = {
        "subject": subject,
        "question_type": qtype,
        "subfield": row.get("subfield"),
        "img_type": row.get("img_type"),
        "topic_difficulty": row.get("topic_difficulty"),
        "image_count": len(images),
        "medevalkit_images": 1 if image_bytes(row.get("image_1")) else 0,
    }
    if qtype == "multiple-choice" and choices:
        options = {LETTERS[i]: str(c) for i, c in enumerate(choices[: len(LETTERS)])}
        letter = as_str(gold[0] if isinstance(gold, list) and gold else gold).upper()
        if letter not in options:
            raise LAYOUT.error(f"item {rid}: answer {gold!r} is not one of the option letters {''.join(options)}")
        return EvalRecord(id=rid, benchmark="mmmu", split=split, question=as_str(row.get("question")),
                          images=images, options=options, answer=letter, answer_type="mcq", meta=meta)
    if gold_list:
        meta["gold_list"] = gold_list
    answer = gold_list[0] if gold_list and len(gold_list) == 1 else as_str(gold)
    return EvalRecord(id=rid, benchmark="mmmu", split=split, question=as_str(row.get("question")), images=images,
                      options=None, answer=answer, answer_type="open", meta=meta)
