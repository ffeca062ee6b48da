"""VQA-RAD in its three published shapes:

- Hugging Face parquet (``flaviagiammarino/vqa-rad``: ``data/test-*.parquet`` with ``image``, ``question``,
  ``answer``; ``OctoMed/VQA-RAD`` adds the MEVF fields);
- the OSF release: ``VQA_RAD Dataset Public.json`` + ``VQA_RAD Image Folder/`` (test = ``phrase_type``
  ``test_freeform`` / ``test_para``);
- MEVF: ``data_RAD/testset.json`` (``trainset.json``) + ``data_RAD/images/``.

``answer_type`` comes from the source when it has one (272 CLOSED / 179 OPEN on test; ``"CLOSED "`` trimmed),
else from the gold (yes/no → closed); ``is_yes_no`` always from the gold (251 on test), MedEvalKit's definition.
``meta``: ``subject`` (image organ), ``question_type``, ``phrase_type``, ``answer_type_raw``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medrwr.eval.datasets._common import (
    Layout,
    as_str,
    image_bytes,
    image_path,
    is_yes_no_answer,
    iter_json_list,
    iter_parquet,
    parquet_files,
)
from medrwr.eval.record import EvalRecord

__all__ = ["DEFAULT_SPLIT", "LAYOUT", "records"]

LAYOUT = Layout(
    "vqa_rad",
    "<root>/data/test-*.parquet (HF), or <root>/'VQA_RAD Dataset Public.json' + 'VQA_RAD Image Folder/' (OSF), "
    "or <root>/data_RAD/testset.json + data_RAD/images/ (MEVF)",
    "https://huggingface.co/datasets/flaviagiammarino/vqa-rad or https://osf.io/89kps",
)
DEFAULT_SPLIT = "test"
OSF_JSON = "VQA_RAD Dataset Public.json"
OSF_IMAGES = "VQA_RAD Image Folder"


def records(path: Path, split: str) -> Iterator[EvalRecord]:
    root = LAYOUT.require_dir(path)
    if root.is_file():
        root = root.parent
    files = parquet_files(root, split)
    if files:
        return _parquet(files, split)
    if (root / OSF_JSON).is_file():
        if not (root / OSF_IMAGES).is_dir():
            raise LAYOUT.error(f"{root} has {OSF_JSON} but no '{OSF_IMAGES}/'")
        return _osf(root, split)
    for base in (root / "data_RAD", root):
        f = base / f"{split}set.json"
        if f.is_file():
            if not (base / "images").is_dir():
                raise LAYOUT.error(f"{base} has {f.name} but no images/")
            return _mevf(f, base / "images", split)
    raise LAYOUT.error(f"found no {split} split under {root}")


def _record(rid: str, split: str, item: dict[str, Any], images: list[Any], source: str) -> EvalRecord:
    answer = as_str(item.get("answer"))
    raw_type = as_str(item.get("answer_type")).upper()
    yes_no = is_yes_no_answer(answer)
    if raw_type in ("CLOSED", "OPEN"):
        answer_type = raw_type.lower()
    else:
        answer_type = "closed" if yes_no else "open"
    return EvalRecord(
        id=rid,
        benchmark="vqa_rad",
        split=split,
        question=as_str(item.get("question")),
        images=images,
        options=None,
        answer=answer,
        answer_type=answer_type,
        is_yes_no=yes_no,
        meta={
            "modality": item.get("modality"),
            "question_type": item.get("question_type"),
            "subject": item.get("image_organ"),
            "phrase_type": item.get("phrase_type"),
            "answer_type_raw": item.get("answer_type"),
            "image_name": item.get("image_name"),
            "source_format": source,
        },
    )


def _parquet(files: list[Path], split: str) -> Iterator[EvalRecord]:
    for i, row in enumerate(iter_parquet(files)):
        if "question" not in row or "answer" not in row:
            raise LAYOUT.error(f"{files[0]} lacks the question/answer columns")
        img = image_bytes(row.get("image"))
        rid = as_str(row.get("qid")) or f"{split}_{i}"
        yield _record(rid, split, row, [img] if img else [], "parquet")


def _osf(root: Path, split: str) -> Iterator[EvalRecord]:
    want_test = split == "test"
    for item in iter_json_list(root / OSF_JSON, LAYOUT):
        if "phrase_type" not in item or "image_name" not in item:
            raise LAYOUT.error(f"{root / OSF_JSON} items lack phrase_type/image_name")
        if as_str(item["phrase_type"]).startswith("test") != want_test:
            continue
        rid = as_str(item.get("qid"))
        img = image_path(root / OSF_IMAGES, as_str(item["image_name"]), LAYOUT, rid)
        yield _record(rid, split, item, [img], "osf")


def _mevf(file: Path, images: Path, split: str) -> Iterator[EvalRecord]:
    for item in iter_json_list(file, LAYOUT):
        if "image_name" not in item or "question" not in item:
            raise LAYOUT.error(f"{file} items lack image_name/question (is it MEVF's {file.name}?)")
        rid = as_str(item.get("qid"))
        yield _record(rid, split, item, [image_path(images, as_str(item["image_name"]), LAYOUT, rid)], "mevf")
