"""SLAKE (BoKelvin/SLAKE): ``<root>/{train,validate,test}.json`` plus ``imgs/xmlabNNN/source.jpg`` (or the
unextracted ``imgs.zip``). English and Chinese items share the file; ``load(..., languages=["en"])`` keeps the
1,061 English test items, ``None`` keeps all 2,094 (MedEvalKit's set).

``answer_type`` comes from the file (CLOSED/OPEN); ``is_yes_no`` from the gold (Yes/No/是/否). ``meta``:
``modality`` (CT/MRI/X-Ray), ``question_type`` (= ``content_type``), ``subject`` (= ``location``), plus
``base_type``, ``img_name``, ``qid``, ``answer_type_raw``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

from medrwr.eval.datasets._common import Layout, as_str, is_yes_no_answer, iter_json_list
from medrwr.eval.record import EvalRecord

__all__ = ["DEFAULT_SPLIT", "LAYOUT", "records"]

LAYOUT = Layout(
    "slake",
    "<root>/test.json (validate.json, train.json) and <root>/imgs/xmlabNNN/source.jpg or <root>/imgs.zip",
    "https://huggingface.co/datasets/BoKelvin/SLAKE",
)
DEFAULT_SPLIT = "test"
_FILES = {"test": "test.json", "validate": "validate.json", "validation": "validate.json", "train": "train.json"}
_KEYS = ("img_name", "question", "answer", "q_lang", "answer_type")


def records(path: Path, split: str) -> Iterator[EvalRecord]:
    root = LAYOUT.require_dir(path)
    if root.is_file():
        file, root = root, root.parent
    else:
        name = _FILES.get(split, split if split.endswith(".json") else f"{split}.json")
        file = root / name
    if not file.is_file():
        raise LAYOUT.error(f"{file} is missing")
    images = _Images(root)
    return _records(file, split, images)


class _Images:
    """``imgs/<name>`` on disk, else the member of ``imgs.zip`` (read once per image)."""

    def __init__(self, root: Path):
        self.dir = root / "imgs"
        self.zip = root / "imgs.zip"
        self._cache: dict[str, bytes] = {}
        self._zf: zipfile.ZipFile | None = None
        if not self.dir.is_dir() and not self.zip.is_file():
            raise LAYOUT.error(f"{root} has neither imgs/ nor imgs.zip")

    def get(self, name: str, item: str) -> str | bytes:
        p = self.dir / name
        if p.is_file():
            return str(p.resolve())
        if self.zip.is_file():
            if name not in self._cache:
                if self._zf is None:
                    self._zf = zipfile.ZipFile(self.zip)
                members = set(self._zf.namelist())
                member = next((m for m in (f"imgs/{name}", name) if m in members), None)
                if member is None:
                    raise LAYOUT.error(f"image {name!r} of item {item} is in neither imgs/ nor imgs.zip")
                self._cache[name] = self._zf.read(member)
            return self._cache[name]
        raise LAYOUT.error(f"image imgs/{name} of item {item} is missing")


def _records(file: Path, split: str, images: _Images) -> Iterator[EvalRecord]:
    seen: set[str] = set()
    for i, item in enumerate(iter_json_list(file, LAYOUT)):
        missing = [k for k in _KEYS if k not in item]
        if missing:
            raise LAYOUT.error(f"{file}: item {i} lacks {', '.join(missing)} (is this SLAKE's test.json?)")
        qid = as_str(item.get("qid")) or str(i)
        rid = qid if qid not in seen else f"{qid}_{i}"
        seen.add(rid)
        answer = as_str(item["answer"])
        raw_type = as_str(item["answer_type"]).upper()
        yes_no = is_yes_no_answer(answer)
        yield EvalRecord(
            id=rid,
            benchmark="slake",
            split=split,
            question=as_str(item["question"]),
            images=[images.get(as_str(item["img_name"]), rid)],
            options=None,
            answer=answer,
            answer_type="closed" if raw_type == "CLOSED" else "open",
            is_yes_no=yes_no,
            lang=as_str(item["q_lang"]).lower() or "en",
            meta={
                "modality": item.get("modality"),
                "question_type": item.get("content_type"),
                "subject": item.get("location"),
                "content_type": item.get("content_type"),
                "base_type": item.get("base_type"),
                "img_name": item.get("img_name"),
                "qid": item.get("qid"),
                "answer_type_raw": item.get("answer_type"),
            },
        )
