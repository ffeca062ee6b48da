"""PathVQA: Hugging Face parquet (``flaviagiammarino/path-vqa``: ``data/{train,validation,test}-*.parquet``
with ``image``, ``question``, ``answer``; 6,719 test items), or the original release
``pvqa/qas/<split>/<split>_qa.pkl`` + ``pvqa/images/<split>/<image>.jpg`` (6,761 test items).

The pickle is read with an unpickler that only builds lists, dicts and plain values, so a pickle from elsewhere
cannot run code. No answer types are published: ``closed`` = a yes/no gold (MedEvalKit's split).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medrwr.eval.datasets._common import Layout, as_str, image_bytes, is_yes_no_answer, iter_parquet, parquet_files
from medrwr.eval.record import EvalRecord

__all__ = ["DEFAULT_SPLIT", "LAYOUT", "records"]

LAYOUT = Layout(
    "path_vqa",
    "<root>/data/test-*.parquet (HF), or <root>/pvqa/qas/test/test_qa.pkl + pvqa/images/test/ (original)",
    "https://huggingface.co/datasets/flaviagiammarino/path-vqa",
)
DEFAULT_SPLIT = "test"
_PKL_SPLIT = {"validation": "val", "val": "val", "test": "test", "train": "train"}


def records(path: Path, split: str) -> Iterator[EvalRecord]:
    root = LAYOUT.require_dir(path)
    files = parquet_files(root, split)
    if files:
        return _parquet(files, split)
    s = _PKL_SPLIT.get(split, split)
    for base in (root / "pvqa", root):
        pkl = base / "qas" / s / f"{s}_qa.pkl"
        if pkl.is_file():
            images = base / "images" / s
            if not images.is_dir():
                raise LAYOUT.error(f"{base} has {pkl.name} but no images/{s}/")
            return _pickle(pkl, images, split)
    raise LAYOUT.error(f"found no {split} split under {root}")


def _record(rid: str, split: str, question: Any, answer: Any, images: list[Any], source: str) -> EvalRecord:
    ans = as_str(answer)
    yes_no = is_yes_no_answer(ans)
    return EvalRecord(id=rid, benchmark="path_vqa", split=split, question=as_str(question), images=images,
                      answer=ans, answer_type="closed" if yes_no else "open", is_yes_no=yes_no,
                      meta={"source_format": source})


def _parquet(files: list[Path], split: str) -> Iterator[EvalRecord]:
    for i, row in enumerate(iter_parquet(files)):
        if "question" not in row or "answer" not in row:
            raise LAYOUT.error(f"{files[0]} lacks the question/answer columns")
        img = image_bytes(row.get("image"))
        yield _record(f"{split}_{i}", split, row["question"], row["answer"], [img] if img else [], "parquet")


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise LAYOUT.error(f"the pickle holds a {module}.{name} object; only lists of plain dicts are read")


def _pickle(pkl: Path, images: Path, split: str) -> Iterator[EvalRecord]:
    data = _PlainUnpickler(io.BytesIO(pkl.read_bytes())).load()
    if not isinstance(data, list):
        raise LAYOUT.error(f"{pkl} holds a {type(data).__name__}, not a list of items")
    for i, item in enumerate(data):
        name = as_str(item.get("image", item.get("img_id")))
        question = item.get("question", item.get("sent"))
        answer = item.get("answer")
        if answer is None and isinstance(item.get("label"), dict) and item["label"]:
            answer = max(item["label"].items(), key=lambda kv: kv[1])[0]
        if not name or question is None or answer is None:
            raise LAYOUT.error(f"{pkl}: item {i} lacks image/question/answer")
        img = next((images / f"{name}{ext}" for ext in ("", ".jpg", ".png", ".jpeg")
                    if (images / f"{name}{ext}").is_file()), None)
        if img is None:
            raise LAYOUT.error(f"image {name} of item {i} is missing under {images}")
        yield _record(f"{split}_{i}", split, question, answer, [str(img.resolve())], "pkl")
