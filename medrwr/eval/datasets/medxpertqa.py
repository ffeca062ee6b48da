"""MedXpertQA-MM: ``<root>/MM/test.jsonl`` (``dev.jsonl``) + ``<root>/images/<file>`` (``images.zip`` unzipped).

Each line's ``question`` ends with the choices written out (``\\nAnswer Choices: (A) … (E) …``); the record's
``question`` is the stem without them (``meta["question_raw"]`` keeps the original, which MedEvalKit sends *and*
follows with an Options block, so the choices appear twice). ``options`` is the line's dict, ``answer`` its
``label``; every listed image is kept. ``meta``: ``question_type`` (Reasoning/Understanding), ``subject`` (the
``medical_task``: Diagnosis/Treatment/Basic Science, MedEvalKit's second breakdown), ``body_system``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medrwr.eval.datasets._common import Layout, as_str, gold_letter, image_path, inline_options, iter_jsonl
from medrwr.eval.record import EvalRecord

__all__ = ["DEFAULT_SPLIT", "LAYOUT", "records"]

LAYOUT = Layout(
    "medxpertqa",
    "<root>/MM/test.jsonl (or dev.jsonl) + <root>/images/ (images.zip unzipped)",
    "https://huggingface.co/datasets/TsinghuaC3I/MedXpertQA",
)
DEFAULT_SPLIT = "test"


def records(path: Path, split: str) -> Iterator[EvalRecord]:
    root = LAYOUT.require_dir(path)
    file = next((f for f in (root / "MM" / f"{split}.jsonl", root / f"{split}.jsonl") if f.is_file()), None)
    if file is None:
        raise LAYOUT.error(f"{root / 'MM' / f'{split}.jsonl'} is missing")
    images = next((d for d in (root / "images", file.parent / "images") if d.is_dir()), None)
    if images is None:
        raise LAYOUT.error(f"{root} has no images/ folder")
    return _records(file, images, split)


def _records(file: Path, images: Path, split: str) -> Iterator[EvalRecord]:
    for n, item in iter_jsonl(file, LAYOUT):
        rid = as_str(item.get("id")) or str(n)
        raw_opts = item.get("options")
        if not isinstance(raw_opts, dict) or not raw_opts or "label" not in item or "question" not in item:
            raise LAYOUT.error(f"{file}:{n} lacks question/options/label (is it MedXpertQA's MM/{split}.jsonl?)")
        options = {str(k).strip().upper(): as_str(v) for k, v in raw_opts.items()}
        letter = gold_letter(item["label"], options)
        if letter is None:
            raise LAYOUT.error(f"{file}:{n}: label {item['label']!r} is not an option letter")
        raw_q = as_str(item["question"])
        stem, _ = inline_options(raw_q)
        yield EvalRecord(
            id=rid,
            benchmark="medxpertqa",
            split=split,
            question=stem,
            images=[image_path(images, as_str(p), LAYOUT, rid) for p in item.get("images") or []],
            options=options,
            answer=letter,
            answer_type="mcq",
            meta={
                "question_type": item.get("question_type"),
                "subject": item.get("medical_task"),
                "medical_task": item.get("medical_task"),
                "body_system": item.get("body_system"),
                "question_raw": raw_q,
            },
        )
