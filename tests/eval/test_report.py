"""Reports from a hand-made results.jsonl: the numbers in metrics.json, the Markdown tables, the plots, and
`medrwr eval report` over several runs (no model, no data)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from medrwr.cli import main
from medrwr.eval.report import compute_metrics, ece, render


def _row(i, mode, correct, *, answer_type="mcq", bucket=None, conf=None, rounds=0, modality="CT", cdir=None,
         rwr_ok=None):
    row = {
        "id": f"q{i}", "mode": mode, "benchmark": "jsonl", "split": "test", "answer_type": answer_type,
        "meta": {"modality": modality, "question_type": "organ" if i % 2 else "position"},
        "trace": {"rounds": rounds, "confidence": conf, "stop_reason": "answer", "completion_text": "",
                  "cdir": cdir},
        "verdict": {"correct": correct, "parsed": "A", "bucket": bucket or answer_type, "preset": "standard",
                    "em": 1.0 if (answer_type == "open" and correct) else (0.0 if answer_type == "open" else None),
                    "recall": 0.5 if answer_type == "open" else None, "f1": 0.5 if answer_type == "open" else None},
    }
    if rwr_ok is not None:
        row["rwr_verdict"] = dict(row["verdict"], correct=rwr_ok)
    return row


def _cdir(triggered, conf):
    return {"triggered": triggered, "threshold": 0.8, "confidence": conf}


def write_run(path, rows, threshold=0.8):
    path.mkdir(parents=True)
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "run.json").write_text(json.dumps({"identity": {"benchmark": "jsonl", "preset": "standard",
                                                            "model": {"name": "tiny"}, "cdir": {"threshold": threshold},
                                                            "data": {"path": "/d", "files": {"test.jsonl": "x"}}},
                                               "n_items": 4, "status": "finished"}))
    return path


@pytest.fixture
def run(tmp_path):
    rows = [
        _row(0, "direct", True, conf=0.9), _row(1, "direct", False, conf=0.9),
        _row(2, "direct", False, answer_type="closed", bucket="unparsed"),
        _row(3, "direct", True, answer_type="open", modality="MRI"),
        _row(0, "rwr", True, rounds=1, conf=0.95), _row(1, "rwr", False, rounds=2, conf=0.3),
        _row(2, "rwr", True, answer_type="closed", bucket="yes_no", rounds=1, conf=0.6),
        _row(3, "rwr", False, answer_type="open", modality="MRI", rounds=0),
        # CDIR: q1 and q2 were below 0.8 and triggered; q1 wrong→right, q2 right→wrong
        _row(0, "rwr_cdir", True, rounds=1, conf=0.95, cdir=_cdir(False, 0.95), rwr_ok=True),
        _row(1, "rwr_cdir", True, rounds=2, conf=0.7, cdir=_cdir(True, 0.3), rwr_ok=False),
        _row(2, "rwr_cdir", False, answer_type="closed", bucket="yes_no", rounds=1, conf=0.5,
             cdir=_cdir(True, 0.6), rwr_ok=True),
        _row(3, "rwr_cdir", False, answer_type="open", modality="MRI", cdir=_cdir(False, None), rwr_ok=False),
    ]
    return write_run(tmp_path / "run-a", rows)


def test_ece_matches_a_hand_computation():
    # bins: 0.9 → acc 0.5 (|0.5-0.9| * 2/4), 0.2 → acc 0 (|0-0.2| * 2/4)
    value, bins = ece([0.9, 0.9, 0.2, 0.2], [True, False, False, False])
    assert value == pytest.approx(0.5 * 0.4 + 0.5 * 0.2)
    assert [b["n"] for b in bins if b["n"]] == [2, 2]
    assert ece([], []) == (None, [])


def test_metrics_from_saved_results(run):
    m = compute_metrics(run)
    d, r, c = m["modes"]["direct"], m["modes"]["rwr"], m["modes"]["rwr_cdir"]
    assert list(m["modes"]) == ["direct", "rwr", "rwr_cdir"]
    assert d["overall"] == {"n": 4, "correct": 2, "accuracy": 0.5}
    assert d["by_answer_type"]["mcq"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert d["unparsed"] == {"n": 1, "rate": 0.25}
    assert d["by_modality"] == {"CT": {"n": 3, "correct": 1, "accuracy": 1 / 3},
                                "MRI": {"n": 1, "correct": 1, "accuracy": 1.0}}
    assert d["open_scores"]["em"] == 1.0 and d["open_scores"]["n"] == 1
    assert r["retrieval"] == {"rate": 0.75, "mean_rounds": 1.0, "rounds_hist": {"0": 1, "1": 2, "2": 1}}
    assert d["retrieval"]["rate"] == 0.0
    assert r["calibration"]["n"] == 3 and d["calibration"]["ece"] == pytest.approx(0.4)
    cd = c["cdir"]
    assert cd["threshold"] == 0.8 and cd["triggered"] == 2 and cd["trigger_rate"] == 0.5
    assert cd["below"] == {"n": 2, "accuracy_before": 0.5, "accuracy_after": 0.5}
    assert cd["above"] == {"n": 1, "accuracy": 1.0}
    assert cd["flips"] == {"wrong->right": 1, "right->wrong": 1, "right->right": 0, "wrong->wrong": 0}
    assert m["split_files"] == ["test.jsonl"] and m["preset"] == "standard"


def test_render_writes_report_metrics_and_plots(run, tmp_path):
    made = render([run], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| run-a | direct | 4 | 50.0 | 50.0 (2) | 0.0 (1) | 100.0 (1) | 25.0 | 0.0 | 0.00 | 0.400 |" in md
    assert "| MRI | 100.0 (1) | 0.0 (1) | 0.0 (1) |" in md
    assert "Flips: wrong→right 1, right→wrong 1" in md and "split file(s): `test.jsonl`" in md
    names = sorted(p.split("/")[-1] for p in made["plots"])
    assert names == ["accuracy_by_mode.png", "cdir_flips.png", "cdir_threshold.png", "reliability.png",
                     "retrieval.png"]
    for p in made["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["modes"]["rwr"]["overall"]["n"] == 4


def test_eval_report_cli_side_by_side(run, tmp_path, capsys):
    other = write_run(tmp_path / "run-b", [_row(i, "direct", True) for i in range(4)])
    out = tmp_path / "cmp"
    code = main(["eval", "report", str(run), str(other), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    md = (out / "report.md").read_text()
    assert "| run-b | direct | 4 | 100.0 |" in md and "| run-a | rwr_cdir | 4 | 50.0 |" in md
    assert md.count("\n## run-") == 2
    assert {p.name for p in out.glob("*.png")} >= {"accuracy_by_mode.png", "run1_retrieval.png", "run2_retrieval.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in metrics["runs"]] == ["run-a", "run-b"]
