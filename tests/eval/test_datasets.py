"""Every benchmark loader on synthetic fixtures written in each published format (medrwr.testing.benchmarks)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from medrwr.errors import DatasetError, MedRwRError
from medrwr.eval import datasets
from medrwr.eval.datasets._common import gold_letter, inline_options
from medrwr.eval.record import EvalRecord
from medrwr.testing.benchmarks import FORMATS, write_fixture

CASES = [(name, fmt) for name, fmts in FORMATS.items() for fmt in fmts]


def _answers(path: Path) -> dict[str, str]:
    root = path if path.is_dir() else path.parent
    return json.loads((root / "fixture_answers.json").read_text(encoding="utf-8"))


def test_every_benchmark_has_a_fixture_writer():
    assert set(FORMATS) == set(datasets.NAMES)


@pytest.mark.parametrize("name,fmt", CASES)
def test_loader_reads_every_format(tmp_path, name, fmt):
    path = write_fixture(name, tmp_path, n=6, fmt=fmt)
    records = datasets.load(name, path)
    assert len(records) == 6
    assert {r.id: r.answer for r in records} == _answers(path)
    for r in records:
        assert isinstance(r, EvalRecord) and r.benchmark == name and r.question
        assert r.answer_type in ("mcq", "closed", "open")
        if r.answer_type == "mcq":
            assert r.answer in r.options and list(r.options) == list("ABCDEFGHIJ"[: len(r.options)])
            assert all(v and v == v.strip() for v in r.options.values())
        for img in r.images:  # a real file, or the PNG bytes of a parquet/zip source
            data = Path(img).read_bytes() if isinstance(img, str) else img
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.dumps(r.to_dict())  # JSON-able, images as short references
    summary = datasets.describe(records)
    assert summary["n"] == 6 and sum(summary["by_bucket"].values()) == 6
    assert summary["by_benchmark"] == {name: 6}


def test_describe_counts_buckets_and_meta(tmp_path):
    summary = datasets.describe(datasets.load("slake", write_fixture("slake", tmp_path)))
    assert summary["by_bucket"] == {"yes_no": 3, "open": 2, "closed": 1}
    assert summary["by_lang"] == {"en": 4, "zh": 2}
    assert summary["by_modality"] == {"CT": 3, "MRI": 2, "X-Ray": 1}
    assert summary["by_question_type"]["Modality"] == 2


@pytest.mark.parametrize("languages,n", [(None, 6), (["en"], 4), ("zh", 2), ("en,zh", 6), (["fr"], 0)])
def test_slake_languages(tmp_path, languages, n):
    path = write_fixture("slake", tmp_path, fmt="zip")
    records = datasets.load("slake", path, languages=languages)
    assert len(records) == n
    assert all(isinstance(r.images[0], bytes) for r in records)  # read from imgs.zip, not extracted


def test_slake_record_fields(tmp_path):
    r = {r.id: r for r in datasets.load("slake", write_fixture("slake", tmp_path))}
    assert (r["11000"].answer, r["11000"].answer_type, r["11000"].is_yes_no) == ("Yes", "closed", True)
    assert (r["11003"].answer, r["11003"].answer_type, r["11003"].is_yes_no) == ("Left", "closed", False)
    assert r["11002"].lang == "zh" and r["11002"].is_yes_no  # 是
    assert r["11001"].meta["subject"] == "Abdomen" and r["11001"].meta["question_type"] == "Organ"
    assert r["11000"].images[0].endswith("imgs/xmlab100/source.jpg")


def test_vqa_rad_answer_type_from_source_and_yes_no_from_gold(tmp_path):
    osf = {r.id: r for r in datasets.load("vqa_rad", write_fixture("vqa_rad", tmp_path / "o", fmt="osf"))}
    assert osf["102"].answer_type == "closed"  # "CLOSED " with a trailing space, as in the OSF JSON
    assert osf["103"].answer == "AP" and osf["103"].answer_type == "closed" and not osf["103"].is_yes_no
    assert osf["104"].answer == "2"  # integer answers become text
    assert osf["100"].meta["subject"] == "CHEST" and osf["100"].meta["question_type"] == "PRES"
    hf = datasets.load("vqa_rad", write_fixture("vqa_rad", tmp_path / "h", fmt="parquet"))
    assert [r.answer_type for r in hf] == ["closed", "open", "closed", "open", "open", "closed"]  # by yes/no


@pytest.mark.parametrize("fmt", ["osf", "mevf"])
def test_vqa_rad_train_split(tmp_path, fmt):
    path = write_fixture("vqa_rad", tmp_path, fmt=fmt)
    assert [r.id for r in datasets.load("vqa_rad", path, split="train")] == ["999"]


def test_path_vqa_pickle_refuses_objects(tmp_path):
    path = write_fixture("path_vqa", tmp_path, fmt="pkl")
    pkl = path / "pvqa" / "qas" / "test" / "test_qa.pkl"
    pkl.write_bytes(pickle.dumps([{"image": "test_0000", "question": "q", "answer": Path("x")}]))
    with pytest.raises(DatasetError, match="only lists of plain dicts"):
        datasets.load("path_vqa", path)


def test_pmc_vqa_choices_cleaned_and_raw_kept(tmp_path):
    r = datasets.load("pmc_vqa", write_fixture("pmc_vqa", tmp_path))[1]
    assert r.options == {"A": "Diffuse uptake pattern", "B": "Focal uptake", "C": "No uptake", "D": "Ring-like uptake"}
    assert r.meta["medevalkit_answer"] == "C:No uptake" and r.answer == "C"
    assert r.meta["medevalkit_choices"][0] == " A:Diffuse uptake pattern " and r.meta["file"] == "test_2.csv"


def test_pmc_vqa_unmatched_gold_fails_naming_the_row(tmp_path):
    path = write_fixture("pmc_vqa", tmp_path)
    csv = path / "test_2.csv"
    csv.write_text(csv.read_text(encoding="utf-8").replace("C:No uptake,test", "Something else,test"), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"test_2.csv:3: answer 'Something else' matches none"):
        datasets.load("pmc_vqa", path)


def test_omnimedvqa_modality_key_repaired_and_two_options(tmp_path):
    r = {r.id: r for r in datasets.load("omnimedvqa", write_fixture("omnimedvqa", tmp_path))}
    two = r["Chest_CT_Scan_001"]
    assert list(two.options) == ["A", "B"] and two.answer == "A"
    assert two.meta["modality"] == "Fundus Photography" and two.meta["subject"] == "Chest CT Scan"


def test_omnimedvqa_unmatched_gold_is_skipped_with_a_warning(tmp_path, caplog):
    path = write_fixture("omnimedvqa", tmp_path)
    f = path / "QA_information" / "Open-access" / "ACRIMA.json"
    items = json.loads(f.read_text())
    items[0]["gt_answer"] = "Retinopathy"
    f.write_text(json.dumps(items))
    assert len(datasets.load("omnimedvqa", path)) == 5
    assert "ACRIMA_000" in caplog.text


def test_mmmu_fields(tmp_path):
    r = {r.id: r for r in datasets.load("mmmu", write_fixture("mmmu", tmp_path, n=5))}
    first = r["validation_Basic_Medical_Science_1"]
    assert first.options["C"] == "Right Ventricle" and "<image 1>" in first.question
    assert len(first.images) == 2 and first.meta["medevalkit_images"] == 1
    letter_open = r["validation_Pharmacy_4"]
    assert (letter_open.answer_type, letter_open.answer, letter_open.options) == ("open", "B", None)
    listed = r["validation_Public_Health_5"]
    assert listed.meta["gold_list"] == ["0.5", "1/2"] and listed.images == []


def test_mmmu_test_split_needs_the_answer_file(tmp_path):
    path = write_fixture("mmmu", tmp_path, n=3)
    for f in path.glob("*/validation-*.parquet"):
        f.rename(f.with_name(f.name.replace("validation", "test")))
    with pytest.raises(DatasetError, match="answer_dict_test.json"):
        datasets.load("mmmu", path, split="test")
    (path / "answer_dict_test.json").write_text(json.dumps({
        "validation_Basic_Medical_Science_1": {"question_type": "multiple-choice", "ground_truth": "D"},
        "validation_Clinical_Medicine_2": {"question_type": "multiple-choice", "ground_truth": "A"},
        "validation_Diagnostics_and_Laboratory_Medicine_3": "C"}))
    assert [r.answer for r in datasets.load("mmmu", path, split="test")] == ["D", "A", "C"]


def test_medxpertqa_stem_without_inline_choices(tmp_path):
    r = datasets.load("medxpertqa", write_fixture("medxpertqa", tmp_path))[1]
    assert "Answer Choices" not in r.question and "Answer Choices: (A) Aortic" in r.meta["question_raw"]
    assert len(r.images) == 2 and r.meta["subject"] == "Treatment" and r.meta["question_type"] == "Reasoning"


def test_ecbench_inline_choices_and_similar_image(tmp_path):
    r = datasets.load("ecbench", write_fixture("ecbench", tmp_path))[0]
    assert r.options["D"] == "Pericardial effusion" and r.question == "What does this echocardiogram show?"
    assert r.answer == "A" and Path(r.meta["similar_image"]).is_file() and len(r.images) == 2


def test_limit_and_file_order(tmp_path):
    path = write_fixture("jsonl", tmp_path, n=9)
    assert [r.id for r in datasets.load("jsonl", path, limit=3)] == ["q0", "q1", "q2"]


# --- failures: one message naming the layout and the source, before any item is read --------------------


@pytest.mark.parametrize("name", datasets.NAMES)
def test_missing_path_names_layout_and_source(tmp_path, name):
    with pytest.raises(DatasetError) as err:
        datasets.load(name, tmp_path / "nowhere")
    msg = str(err.value)
    assert msg.startswith(f"{name}: ") and "expected" in msg and "get it from" in msg and "\n" not in msg
    assert err.value.exit_code == 2 and isinstance(err.value, (MedRwRError, ValueError))


@pytest.mark.parametrize("name", [n for n in datasets.NAMES if n not in ("jsonl", "ecbench")])
def test_empty_folder_is_refused(tmp_path, name):
    with pytest.raises(DatasetError, match="expected"):
        datasets.load(name, tmp_path)


def test_unknown_benchmark():
    with pytest.raises(DatasetError, match="choose one of: vqa_rad, slake"):
        datasets.load("slake2", ".")


def test_slake_without_images(tmp_path):
    path = write_fixture("slake", tmp_path)
    import shutil

    shutil.rmtree(path / "imgs")
    with pytest.raises(DatasetError, match="neither imgs/ nor imgs.zip"):
        datasets.iter_records("slake", path)  # checked when the iterator is made, before any item


def test_jsonl_bad_line_duplicate_id_and_bad_answer(tmp_path):
    f = tmp_path / "test.jsonl"
    f.write_text('{"id": 1, "question": "q?", "answer": "yes"}\n{oops\n')
    with pytest.raises(DatasetError, match=r"test.jsonl:2 is not valid JSON"):
        datasets.load("jsonl", f)
    f.write_text('{"id": 1, "question": "q?", "answer": "yes"}\n{"id": 1, "question": "r?", "answer": "no"}\n')
    with pytest.raises(DatasetError, match="duplicate id '1'"):
        datasets.load("jsonl", tmp_path)
    f.write_text('{"question": "q?", "options": {"A": "x", "B": "y"}, "answer": "z"}\n')
    with pytest.raises(DatasetError, match="neither an option letter"):
        datasets.load("jsonl", f)
    f.write_text('{"question": "q?", "images": ["missing.png"], "answer": "no"}\n')
    with pytest.raises(DatasetError, match="image 'missing.png' of item 1 is missing"):
        datasets.load("jsonl", f)


@pytest.mark.parametrize(
    "gold,expected",
    [("A:Liver", "A"), ("B. Pericardial effusion", "B"), ("(C)", "C"), ("c", "C"), ("b", "B"),
     (" lung ", "C"), ("PERICARDIAL EFFUSION", "B"), ("C. difficile colitis", "D"), ("Heart", None),
     ("E", None), ("A: Lung", "A")],
)
def test_gold_letter_normalisation(gold, expected):
    options = {"A": "Liver", "B": "Pericardial effusion", "C": "Lung", "D": "C. difficile colitis"}
    assert gold_letter(gold, options) == expected


def test_inline_options_needs_consecutive_letters():
    assert inline_options("Pick one.\nA. x\nC. y") == ("Pick one.\nA. x\nC. y", None)
    assert inline_options("Q\n(A) x\n(B) y")[1] == {"A": "x", "B": "y"}


def _mmmu_rows(prefix: str, subject_col: bool = False) -> list[dict]:
    from medrwr.testing.benchmarks import png_bytes

    rows = []
    for i, subject in enumerate(["Clinical_Medicine", "History", "Pharmacy"]):
        row = {"id": f"{prefix}_{subject}_{i + 1}", "question": "<image 1> Which?", "answer": "B",
               "options": str(["w", "x", "y", "z"]), "image_1": {"bytes": png_bytes(i), "path": "a.png"}}
        if subject_col:
            row["subject"] = subject.replace("_", " ")
        rows.append(row)
    return rows


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({k: pa.array([r[k] for r in rows], type=img if k == "image_1" else None)
                             for k in rows[0]}), str(path))


def test_mmmu_merged_parquet_keeps_health_and_medicine(tmp_path):
    _write_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", _mmmu_rows("validation"))
    records = datasets.load("mmmu", tmp_path)
    assert [r.meta["subject"] for r in records] == ["Clinical_Medicine", "Pharmacy"]  # History dropped
    assert all(r.answer_type == "mcq" and r.meta["question_type"] == "multiple-choice" for r in records)


def test_mmmu_pro_standard(tmp_path):
    _write_parquet(tmp_path / "standard (10 options)" / "test-00000-of-00001.parquet",
                   _mmmu_rows("test", subject_col=True))
    records = datasets.load("mmmu", tmp_path, split="pro10")
    assert [r.id for r in records] == ["test_Clinical_Medicine_1", "test_Pharmacy_3"]
    with pytest.raises(DatasetError, match=r"standard \(4 options\)"):
        datasets.load("mmmu", tmp_path, split="pro4")


def test_duplicate_ids_across_a_source_are_refused(tmp_path):
    path = write_fixture("pmc_vqa", tmp_path)
    csv = path / "test_2.csv"
    lines = csv.read_text(encoding="utf-8").splitlines()
    lines[2] = "0" + lines[2][1:]  # row 2 reuses index 0
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="two items share the id '0'"):
        datasets.load("pmc_vqa", path)
