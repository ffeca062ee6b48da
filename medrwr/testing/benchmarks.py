"""Synthetic benchmark folders in each exact published schema (docs/BENCHMARKS.md §10): invented questions, tiny
generated PNGs, no real data. ``write_fixture(name, root, n=6, fmt=None)`` returns the path to pass to
``medrwr.eval.datasets.load(name, path)``.

Formats (``fmt``; the first is the default):

- ``jsonl``: ``jsonl`` (options dict, images list), ``json`` (one JSON list)
- ``slake``: ``json`` (``test.json`` + ``imgs/``), ``zip`` (``test.json`` + ``imgs.zip``)
- ``vqa_rad``: ``parquet`` (HF ``data/test-*.parquet``), ``osf`` (``VQA_RAD Dataset Public.json`` + image
  folder), ``mevf`` (``data_RAD/testset.json`` + ``images/``)
- ``path_vqa``: ``parquet``, ``pkl`` (``pvqa/qas/test/test_qa.pkl`` + ``pvqa/images/test/``)
- ``pmc_vqa``: ``v2`` (``test_2.csv``, ten columns, ``A:``-prefixed choices, ``figures/``), ``v1``
  (``test_clean.csv`` with ``Answer_label``, ``images/``)
- ``omnimedvqa``: ``json`` (``QA_information/Open-access/*.json`` + ``Images/``; one item with only two options
  and one with the ``modality`` key)
- ``mmmu``: ``parquet`` (``<Subject>/validation-00000-of-00001.parquet``; stringified options, ``<image 1>``)
- ``medxpertqa``: ``jsonl`` (``MM/test.jsonl`` with inline ``Answer Choices`` + ``images/``)
- ``ecbench``: ``jsonl`` (``test.jsonl``: images list, inline choices, ``"B. text"`` answers, ``similar_image``)

Every item's gold answer is recorded in ``<root>/fixture_answers.json`` (id → answer as the loader normalises it),
so tests can check the loader against what was written.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "png_bytes", "write_fixture"]

_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def png_bytes(i: int = 0, size: int = 8) -> bytes:
    """A tiny solid-colour PNG (colour picked by ``i``)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), _COLOURS[i % len(_COLOURS)]).save(buf, format="PNG")
    return buf.getvalue()


def _png(path: Path, i: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(i))
    return path.name


def _answers(root: Path, answers: dict[str, str]) -> None:
    (root / "fixture_answers.json").write_text(json.dumps(answers, ensure_ascii=False, indent=1), encoding="utf-8")


def _jsonl_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# --- jsonl --------------------------------------------------------------------------------------------------


def _jsonl(root: Path, n: int, fmt: str) -> Path:
    rows, answers = [], {}
    for i in range(n):
        img = f"images/img_{i}.png"
        _png(root / img, i)
        kind = i % 3
        if kind == 0:
            row = {"id": f"q{i}", "question": f"Which organ is shown in image {i}?", "images": [img],
                   "options": {"A": "Liver", "B": "Lung", "C": "Heart", "D": "Kidney"}, "answer": "B. Lung",
                   "modality": "CT", "question_type": "organ", "subject": "chest"}
            answers[row["id"]] = "B"
        elif kind == 1:
            row = {"id": f"q{i}", "question": f"Is there an effusion in image {i}?", "image": img, "answer": "No",
                   "answer_type": "closed", "modality": "X-Ray"}
            answers[row["id"]] = "No"
        else:
            row = {"id": f"q{i}", "question": f"Where is the lesion in image {i}?", "images": [img],
                   "answer": "right upper lobe", "lang": "en", "modality": "CT", "extra_field": i}
            answers[row["id"]] = "right upper lobe"
        rows.append(row)
    if fmt == "json":
        (root / "test.json").write_text(json.dumps(rows), encoding="utf-8")
        _answers(root, answers)
        return root / "test.json"
    _jsonl_lines(root / "test.jsonl", rows)
    _answers(root, answers)
    return root


# --- slake --------------------------------------------------------------------------------------------------

_SLAKE_ITEMS = [
    ("en", "Is this a CT image?", "Yes", "CLOSED", "Modality", "CT", "Abdomen"),
    ("en", "Which organ is abnormal?", "Liver", "OPEN", "Organ", "CT", "Abdomen"),
    ("zh", "这是CT图像吗?", "是", "CLOSED", "Modality", "CT", "Abdomen"),
    ("en", "Which lung is affected, left or right?", "Left", "CLOSED", "Position", "X-Ray", "Chest"),
    ("zh", "图中异常的器官是什么?", "肝脏", "OPEN", "Organ", "MRI", "Abdomen"),
    ("en", "Does the picture contain a tumor?", "No", "CLOSED", "Abnormality", "MRI", "Brain"),
]


def _slake(root: Path, n: int, fmt: str) -> Path:
    rows, answers, blobs = [], {}, {}
    for i in range(n):
        lang, q, a, at, ct, mod, loc = _SLAKE_ITEMS[i % len(_SLAKE_ITEMS)]
        name = f"xmlab{100 + i // 2}/source.jpg"  # two questions per image, as in SLAKE
        blobs[name] = png_bytes(i // 2)
        qid = 11000 + i
        rows.append({"img_id": 100 + i // 2, "img_name": name, "question": q, "answer": a, "q_lang": lang,
                     "location": loc, "modality": mod, "answer_type": at, "base_type": "vqa",
                     "triple": ["vhead", "_", "_"], "qid": qid, "content_type": ct})
        answers[str(qid)] = a
    root.mkdir(parents=True, exist_ok=True)
    (root / "test.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    if fmt == "zip":
        with zipfile.ZipFile(root / "imgs.zip", "w") as zf:
            for name, data in blobs.items():
                zf.writestr(f"imgs/{name}", data)
    else:
        for name, data in blobs.items():
            (root / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "imgs" / name).write_bytes(data)
    _answers(root, answers)
    return root


def _parquet(path: Path, rows: list[dict[str, Any]], image_cols: tuple[str, ...] = ()) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols: dict[str, Any] = {}
    for key in rows[0]:
        values = [r.get(key) for r in rows]
        cols[key] = pa.array(values, type=img_type) if key in image_cols else pa.array(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), str(path))


def _img_cell(i: int | None) -> dict[str, Any] | None:
    return None if i is None else {"bytes": png_bytes(i), "path": f"img_{i}.png"}


# --- vqa_rad --------------------------------------------------------------------------------------------------

_RAD_ITEMS = [
    ("is there a pneumothorax?", "yes", "CLOSED", "PRES", "CHEST"),
    ("what organ is enlarged?", "liver", "OPEN", "ORGAN", "ABD"),
    ("is this an mri?", "no", "CLOSED ", "MODALITY", "HEAD"),
    ("is the image taken ap or pa?", "AP", "CLOSED", "PLANE", "CHEST"),
    ("how many lesions are seen?", 2, "OPEN", "COUNT", "ABD"),
    ("is the heart normal in size?", "Yes", "CLOSED", "SIZE", "CHEST"),
]


def _vqa_rad(root: Path, n: int, fmt: str) -> Path:
    items = [_RAD_ITEMS[i % len(_RAD_ITEMS)] for i in range(n)]
    answers: dict[str, str] = {}
    if fmt == "parquet":
        rows = [{"image": _img_cell(i), "question": q, "answer": str(a)} for i, (q, a, *_rest) in enumerate(items)]
        _parquet(root / "data" / "test-00000-of-00001-abc123.parquet", rows, ("image",))
        _parquet(root / "data" / "train-00000-of-00001-def456.parquet", rows[:2], ("image",))
        answers = {f"test_{i}": str(a) for i, (q, a, *_r) in enumerate(items)}
        _answers(root, answers)
        return root
    rows = []
    for i, (q, a, at, qt, organ) in enumerate(items):
        name = f"synpic{1000 + i}.jpg"
        row = {"qid": 100 + i, "image_name": name, "image_organ": organ, "answer": a, "answer_type": at,
               "question_type": qt, "question": q, "phrase_type": "test_freeform" if i % 2 == 0 else "test_para"}
        if fmt == "osf":
            row.update({"qid_linked_id": f"link{i}", "image_case_url": "https://example.invalid/case",
                        "evaluation": "given", "question_rephrase": "NULL", "question_relation": "NULL",
                        "question_frame": "NULL"})
        rows.append(row)
        answers[str(100 + i)] = str(a)
    extra = dict(rows[0], qid=999, phrase_type="freeform")  # a train row: not in the test split
    if fmt == "osf":
        img_dir = root / "VQA_RAD Image Folder"
        for i, r in enumerate(rows):
            _png(img_dir / r["image_name"], i)
        (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows + [extra], indent=1), encoding="utf-8")
    else:
        base = root / "data_RAD"
        for i, r in enumerate(rows):
            _png(base / "images" / r["image_name"], i)
        base.mkdir(parents=True, exist_ok=True)
        (base / "testset.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
        (base / "trainset.json").write_text(json.dumps([extra]), encoding="utf-8")
    _answers(root, answers)
    return root


# --- path_vqa -------------------------------------------------------------------------------------------------

_PATH_ITEMS = [("does this image show necrosis?", "yes"), ("what have lost their nuclei?", "neutrophils"),
               ("is the liver normal?", "no"), ("what is present?", "granuloma")]


def _path_vqa(root: Path, n: int, fmt: str) -> Path:
    items = [_PATH_ITEMS[i % len(_PATH_ITEMS)] for i in range(n)]
    answers = {f"test_{i}": a for i, (_q, a) in enumerate(items)}
    if fmt == "parquet":
        rows = [{"image": _img_cell(i), "question": q, "answer": a} for i, (q, a) in enumerate(items)]
        _parquet(root / "data" / "test-00000-of-00001-0a1b.parquet", rows, ("image",))
    else:
        import pickle

        rows = []
        for i, (q, a) in enumerate(items):
            _png(root / "pvqa" / "images" / "test" / f"test_{i:04d}.jpg", i)
            rows.append({"image": f"test_{i:04d}", "question": q, "answer": a})
        (root / "pvqa" / "qas" / "test").mkdir(parents=True, exist_ok=True)
        (root / "pvqa" / "qas" / "test" / "test_qa.pkl").write_bytes(pickle.dumps(rows))
    _answers(root, answers)
    return root


# --- pmc_vqa --------------------------------------------------------------------------------------------------

_PMC_CHOICES = [" A:Diffuse uptake pattern ", "B:Focal uptake\xa0", "C:No uptake", "D:'Ring-like uptake'"]


def _pmc_vqa(root: Path, n: int, fmt: str) -> Path:
    import csv

    answers: dict[str, str] = {}
    img_dir = root / ("figures" if fmt == "v2" else "images")
    golds_v2 = ["B", "C:No uptake", "Diffuse uptake pattern", "D"]  # letter, "X:text", bare text
    path = root / ("test_2.csv" if fmt == "v2" else "test_clean.csv")
    root.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        if fmt == "v2":
            w.writerow(["index", "Figure_path", "Caption", "Question", "Choice A", "Choice B", "Choice C",
                        "Choice D", "Answer", "split"])
        else:
            w.writerow(["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D",
                        "Answer_label"])
        for i in range(n):
            fig = f"PMC{8000 + i}_fig{i}.jpg"
            _png(img_dir / fig, i)
            q = f"What pattern does figure {i} show?"
            if fmt == "v2":
                gold = golds_v2[i % len(golds_v2)]
                w.writerow([i, fig, "A synthetic caption.", q, *_PMC_CHOICES, gold, "test"])
                answers[str(i)] = "BCAD"[i % 4]
            else:
                letter = "ABCD"[i % 4]
                text = _PMC_CHOICES["ABCD".index(letter)].split(":", 1)[1]
                w.writerow([fig, q, text, *_PMC_CHOICES, letter])
                answers[str(i + 1)] = letter
    _answers(root, answers)
    return root if fmt == "v2" else path


# --- omnimedvqa -----------------------------------------------------------------------------------------------


def _omnimedvqa(root: Path, n: int, fmt: str) -> Path:
    answers: dict[str, str] = {}
    per_file: dict[str, list[dict[str, Any]]] = {"ACRIMA": [], "Chest CT Scan": []}
    for i in range(n):
        ds = "ACRIMA" if i % 2 == 0 else "Chest CT Scan"
        rel = f"Images/{ds}/img_{i}.png"
        _png(root / rel, i)
        item = {"dataset": ds, "question_id": f"{ds.replace(' ', '_')}_{i:03d}",
                "question_type": "Disease Diagnosis" if i % 3 else "Modality Recognition",
                "question": f"What does image {i} show?", "image_path": rel,
                "option_A": "Glaucoma", "option_B": "Normal", "option_C": "Cataract", "option_D": "Myopia",
                "gt_answer": ["Normal", "Glaucoma", "Cataract"][i % 3], "modality_type": "Fundus Photography"}
        if i == 1:  # only two options, and the one item keyed `modality` (as in "Chest CT Scan.json")
            del item["option_C"], item["option_D"]
            item["gt_answer"] = "Glaucoma"
            item["modality"] = item.pop("modality_type")
        per_file[ds].append(item)
        answers[item["question_id"]] = "ABCD"[["Glaucoma", "Normal", "Cataract", "Myopia"].index(item["gt_answer"])]
    qa = root / "QA_information" / "Open-access"
    qa.mkdir(parents=True, exist_ok=True)
    (root / "QA_information" / "Restricted-access").mkdir(parents=True, exist_ok=True)
    for ds, items in per_file.items():
        if items:
            (qa / f"{ds}.json").write_text(json.dumps(items, indent=1), encoding="utf-8")
    _answers(root, answers)
    return root


# --- mmmu -----------------------------------------------------------------------------------------------------


def _mmmu(root: Path, n: int, fmt: str) -> Path:
    from medrwr.eval.datasets.mmmu import SUBJECTS

    answers: dict[str, str] = {}
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for i in range(n):
        subject = SUBJECTS[i % len(SUBJECTS)]
        rid = f"validation_{subject}_{i + 1}"
        row: dict[str, Any] = {"id": rid, "question": f"<image 1> Which chamber is marked in case {i}?",
                               "options": "['Right Atrium', 'Left Atrium', \"Right Ventricle\", 'Left Ventricle']",
                               "explanation": "", "img_type": "['Diagrams']", "answer": "BCAD"[i % 4],
                               "topic_difficulty": "Medium", "question_type": "multiple-choice",
                               "subfield": "Cardiology"}
        if i % 5 == 3:  # an open item with a letter gold (as validation_Pharmacy_19)
            row.update(options="[]", answer="B", question_type="open",
                       question="<image 1> Which label marks the aorta?")
        if i % 5 == 4:  # an open item with a stringified list of golds
            row.update(options="[]", answer="['0.5', '1/2']", question_type="open",
                       question="What fraction of the dose remains after one half-life?")
        for k in range(1, 8):
            row[f"image_{k}"] = _img_cell(i) if k == 1 and i % 5 != 4 else (_img_cell(i + 1) if k == 2 and i == 0
                                                                            else None)
        by_subject.setdefault(subject, []).append(row)
        answers[rid] = row["answer"]
    for subject, rows in by_subject.items():
        _parquet(root / subject / "validation-00000-of-00001.parquet", rows, tuple(f"image_{k}" for k in range(1, 8)))
    _answers(root, answers)
    return root


# --- medxpertqa -----------------------------------------------------------------------------------------------


def _medxpertqa(root: Path, n: int, fmt: str) -> Path:
    opts = {"A": "Aortic stenosis", "B": "Mitral regurgitation", "C": "Pericarditis", "D": "Myocarditis",
            "E": "Endocarditis"}
    rows, answers = [], {}
    for i in range(n):
        imgs = [_png(root / "images" / f"MM_{i}_{k}.png", i + k) for k in range(1 + i % 2)]
        inline = " ".join(f"({k}) {v}" for k, v in opts.items())
        rows.append({"id": f"MM-{1000 + i}", "question": f"A 60-year-old presents with a murmur (case {i}). "
                     f"What is the diagnosis?\nAnswer Choices: {inline}", "options": opts, "label": "ABCDE"[i % 5],
                     "images": imgs, "medical_task": ["Diagnosis", "Treatment", "Basic Science"][i % 3],
                     "body_system": "Cardiovascular", "question_type": "Reasoning" if i % 2 else "Understanding"})
        answers[f"MM-{1000 + i}"] = "ABCDE"[i % 5]
    _jsonl_lines(root / "MM" / "test.jsonl", rows)
    _answers(root, answers)
    return root


# --- ecbench --------------------------------------------------------------------------------------------------


def _ecbench(root: Path, n: int, fmt: str) -> Path:
    rows, answers = [], {}
    for i in range(n):
        frames = [f"frames/case{i}_{k}.png" for k in range(2)]
        for k, f in enumerate(frames):
            _png(root / f, i + k)
        _png(root / "similar" / f"case{i}.png", i + 3)
        letter = "ABCD"[i % 4]
        texts = ["Normal", "Dilated cardiomyopathy", "Hypertrophic cardiomyopathy", "Pericardial effusion"]
        rows.append({"id": 500 + i, "images": frames,
                     "question": "What does this echocardiogram show?\n"
                     + "\n".join(f"{k}. {t}" for k, t in zip("ABCD", texts)),
                     "answer": letter if i % 2 else f"{letter}. {texts['ABCD'.index(letter)]}",
                     "similar_image": f"similar/case{i}.png"})
        answers[str(500 + i)] = letter
    _jsonl_lines(root / "test.jsonl", rows)
    _answers(root, answers)
    return root


_WRITERS: dict[str, tuple[tuple[str, ...], Callable[[Path, int, str], Path]]] = {
    "jsonl": (("jsonl", "json"), _jsonl),
    "slake": (("json", "zip"), _slake),
    "vqa_rad": (("parquet", "osf", "mevf"), _vqa_rad),
    "path_vqa": (("parquet", "pkl"), _path_vqa),
    "pmc_vqa": (("v2", "v1"), _pmc_vqa),
    "omnimedvqa": (("json",), _omnimedvqa),
    "mmmu": (("parquet",), _mmmu),
    "medxpertqa": (("jsonl",), _medxpertqa),
    "ecbench": (("jsonl",), _ecbench),
}
FORMATS: dict[str, tuple[str, ...]] = {name: formats for name, (formats, _fn) in _WRITERS.items()}


def write_fixture(name: str, root: str | Path, n: int = 6, *, fmt: str | None = None) -> Path:
    """Write ``n`` synthetic items of benchmark ``name`` under ``root`` in format ``fmt`` (default: the first
    of :data:`FORMATS` ``[name]``); return the path to pass to ``load(name, path)``."""
    if name not in _WRITERS:
        raise ValueError(f"no fixture writer for {name!r}; have: {', '.join(_WRITERS)}")
    formats, fn = _WRITERS[name]
    fmt = fmt or formats[0]
    if fmt not in formats:
        raise ValueError(f"{name} fixtures come in {formats}, not {fmt!r}")
    if n < 1:
        raise ValueError("n must be >= 1")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return fn(root, n, fmt)
