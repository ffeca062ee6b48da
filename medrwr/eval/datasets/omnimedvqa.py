"""OmniMedVQA: ``<root>/QA_information/<Access>/<Dataset>.json`` + ``<root>/Images/…`` (``image_path`` is
relative to the root). ``split``: ``open`` (Open-access, 88,996 items, MedEvalKit's set; the default),
``restricted`` (Restricted-access; fetch its images from the sources yourself) or ``all``. Files are read one at a
time, in name order.

Options are ``option_A`` … ``option_D`` where present (two to four). The gold text becomes a letter by exact match
(MedEvalKit's rule), else case/space-insensitive; an item whose gold matches no option is skipped with a warning.
The ``modality`` key one file uses is read as ``modality_type``. ``meta``: ``modality``, ``question_type``,
``subject`` (the source dataset).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from medrwr.eval.datasets._common import Layout, as_str, gold_letter, image_path, iter_json_list
from medrwr.eval.record import EvalRecord

__all__ = ["DEFAULT_SPLIT", "LAYOUT", "records"]

log = logging.getLogger(__name__)

LAYOUT = Layout(
    "omnimedvqa",
    "<root>/QA_information/Open-access/*.json + <root>/Images/ (OmniMedVQA.zip unzipped)",
    "https://huggingface.co/datasets/foreverbeliever/OmniMedVQA",
)
DEFAULT_SPLIT = "open"
_ACCESS = {"open": ("Open-access",), "restricted": ("Restricted-access",), "all": ("Open-access", "Restricted-access")}


def records(path: Path, split: str) -> Iterator[EvalRecord]:
    root = LAYOUT.require_dir(path)
    if (root / "OmniMedVQA" / "QA_information").is_dir():
        root = root / "OmniMedVQA"
    if split not in _ACCESS:
        raise LAYOUT.error(f"split must be one of {', '.join(_ACCESS)}, not {split!r}")
    files = []
    for access in _ACCESS[split]:
        d = root / "QA_information" / access
        if not d.is_dir():
            raise LAYOUT.error(f"{d} is missing")
        files += sorted(d.glob("*.json"))
    if not files:
        raise LAYOUT.error(f"no .json files under {root / 'QA_information'}")
    if not (root / "Images").is_dir():
        raise LAYOUT.error(f"{root} has no Images/ folder")
    return _records(root, files, split)


def _records(root: Path, files: list[Path], split: str) -> Iterator[EvalRecord]:
    skipped: list[str] = []
    for file in files:
        for item in iter_json_list(file, LAYOUT):
            rid = as_str(item.get("question_id"))
            options = {k: as_str(item[f"option_{k}"]) for k in "ABCD" if item.get(f"option_{k}") not in (None, "")}
            if len(options) < 2 or "gt_answer" not in item or "image_path" not in item:
                raise LAYOUT.error(f"{file}: item {rid or '?'} lacks gt_answer/image_path or two options")
            gt = as_str(item["gt_answer"])
            exact = [k for k, v in options.items() if v == gt]
            letter = exact[0] if exact else gold_letter(gt, options)
            if letter is None:
                skipped.append(rid)
                continue
            modality = item.get("modality_type", item.get("modality"))
            yield EvalRecord(
                id=rid,
                benchmark="omnimedvqa",
                split=split,
                question=as_str(item.get("question")),
                images=[image_path(root, as_str(item["image_path"]), LAYOUT, rid)],
                options=options,
                answer=letter,
                answer_type="mcq",
                meta={
                    "modality": modality,
                    "question_type": item.get("question_type"),
                    "subject": item.get("dataset"),
                    "file": file.name,
                    "medevalkit_answer": letter if exact else gt,
                },
            )
    if skipped:
        log.warning("omnimedvqa: skipped %d item(s) whose gt_answer matches no option: %s", len(skipped),
                    ", ".join(skipped[:10]))
