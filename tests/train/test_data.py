"""Training data loaders: MedQA-USMLE, MedMCQA (both cop conventions), generic MCQ with images; wrong shapes
fail with a one-line error naming file, row and column."""

from __future__ import annotations

import json

import pytest

from medrwr.errors import TrainingDataError
from medrwr.train.data import load_mcq_dataset


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_medqa_jsonl(tmp_path):
    f = _jsonl(tmp_path / "medqa.jsonl", [
        {"question": "Fever and cough?", "options": {"A": "Pneumonia", "B": "Gout", "C": "Acne", "D": "Otitis"},
         "answer_idx": "A", "answer": "Pneumonia", "meta_info": "step1"},
    ])
    ds = load_mcq_dataset(f)
    row = ds[0]
    assert row["answer"] == "A" and row["options"] == ["Pneumonia", "Gout", "Acne", "Otitis"]
    system, user = row["prompt"]
    assert system["role"] == "system" and "image" not in system["content"].split("\n")[0]
    assert user["content"].splitlines() == ["Fever and cough?", "A. Pneumonia", "B. Gout", "C. Acne", "D. Otitis"]
    assert "images" not in ds.column_names


@pytest.mark.parametrize("suffix", ["json", "parquet"])
def test_medmcqa_cop_conventions(tmp_path, suffix):
    rows = [{"question": f"Q{i}?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": cop, "exp": "why"}
            for i, cop in enumerate([1, 2, 3])]  # no 0 and no 4: the file type decides
    if suffix == "json":
        f = tmp_path / "medmcqa.json"
        f.write_text(json.dumps(rows))
        expect = ["A", "B", "C"]  # the original release: 1-based
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        f = tmp_path / "medmcqa.parquet"
        pq.write_table(pa.Table.from_pylist(rows), f)
        expect = ["B", "C", "D"]  # the Hugging Face release: 0-based
    ds = load_mcq_dataset(f)
    assert ds["answer"] == expect and ds[0]["explanation"] == "why"
    assert load_mcq_dataset(f, cop_base=0)["answer"] == ["B", "C", "D"]


def test_medmcqa_zero_or_four_decides(tmp_path):
    rows = [{"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": c} for c in (0, 2)]
    assert load_mcq_dataset(_jsonl(tmp_path / "m.jsonl", rows))["answer"] == ["A", "C"]
    rows = [{"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": c} for c in (4, 2)]
    assert load_mcq_dataset(_jsonl(tmp_path / "n.jsonl", rows))["answer"] == ["D", "B"]


def test_mcq_with_images_uses_image_prompt_and_shrinks(tmp_path):
    from PIL import Image

    Image.new("RGB", (1024, 1024), "gray").save(tmp_path / "x.png")
    f = _jsonl(tmp_path / "mcq.jsonl", [
        {"images": ["x.png"], "question": "Finding?", "options": ["Effusion", "Normal"], "answer": "Normal",
         "explanation": "clear angles"},
    ])
    ds = load_mcq_dataset(f)
    row = ds[0]
    assert row["answer"] == "B" and row["explanation"] == "clear angles"
    assert "image" in row["prompt"][0]["content"].split("\n")[0]
    (img,) = row["images"]
    assert img.size == (512, 512)  # 262,144 pixels, as the rollout would load it


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}, "row 1: column 'answer_idx'"),
        ({"question": "", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}, "column 'question'"),
        ({"question": "Q?", "options": {"A": "x", "C": "y"}, "answer_idx": "A"}, "options keys must be A, B"),
        ({"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 9}, "column 'cop'"),
        ({"question": "Q?", "options": ["x", "y"], "answer": "maybe"}, "column 'answer'"),
        ({"question": "Q?", "options": ["x"], "answer": "A"}, "2-10 non-empty strings"),
        ({"question": "Q?", "options": ["x", "y"], "answer": "A", "images": ["missing.png"]}, "does not exist"),
        ({"text": "no schema"}, "cannot tell the format"),
    ],
)
def test_wrong_shapes_are_one_line_errors(tmp_path, row, message):
    f = _jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(TrainingDataError, match=message.replace("(", r"\(")) as exc:
        load_mcq_dataset(f)
    assert "\n" not in str(exc.value) and str(f) in str(exc.value)


def test_bad_files(tmp_path):
    with pytest.raises(TrainingDataError, match="does not exist"):
        load_mcq_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(TrainingDataError, match="unsupported dataset file type"):
        load_mcq_dataset(tmp_path / "x.csv")
    (tmp_path / "y.jsonl").write_text("{not json}\n")
    with pytest.raises(TrainingDataError, match="y.jsonl:1: not valid JSON"):
        load_mcq_dataset(tmp_path / "y.jsonl")
