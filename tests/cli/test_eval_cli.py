"""`medrwr eval run|data|report` as users call them: kill -9 mid-run then resume (every item exactly once),
a torn last line and a corrupt line in results.jsonl, the loader summary, and errors before any model loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from medrwr.cli import main
from medrwr.testing.benchmarks import write_fixture

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fixture("jsonl", tmp_path_factory.mktemp("cli-eval-data"), n=8)


def _args(data, tiny_vlm_dir, out, *extra):
    return ["eval", "run", "--benchmark", "jsonl", "--data", str(data), "--model", str(tiny_vlm_dir), "--mode",
            "direct", "--config", str(ROOT / "configs/tiny/eval.yaml"), "--batch-size", "2", "--out", str(out),
            *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_kill_9_then_resume_runs_every_item_exactly_once(data, tiny_vlm_dir, tmp_path, capsys):
    out = tmp_path / "run"
    results = out / "results.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "medrwr", *_args(data, tiny_vlm_dir, out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (results.is_file() and results.read_bytes().count(b"\n") >= 2):  # the first batch is durable
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first batch was never written"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    first = _lines(results)
    assert 2 <= len(first) <= 8 and len({r["id"] for r in first}) == len(first)

    # the torn last write of an interrupted run is cut off (with a warning), its item runs again
    with open(results, "a") as f:
        f.write('{"id": "q11", "mode": "dir')
    code = main(_args(data, tiny_vlm_dir, out))
    err = capsys.readouterr().err
    assert code == 0, err
    rows = _lines(results)
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(8))  # every item exactly once
    assert rows[: len(first)] == first  # nothing redone or rewritten
    assert f"(+{len(first)} already done)" in err and "items/s" in err and "ETA" in err
    assert (out / "report.md").is_file() and (out / "metrics.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["modes"]["direct"]["overall"]["n"] == 8

    # a corrupt line in the middle is an error naming the file and line, before any model loads
    text = results.read_text().splitlines(keepends=True)
    results.write_text("".join(text[:2] + ["{not json\n"] + text[2:]))
    code = main(_args(data, tiny_vlm_dir, out))
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and "results.jsonl line 3 is not a valid result" in err and "Traceback" not in err
    code = main(["eval", "report", str(out)])
    assert code == 1 and "line 3" in capsys.readouterr().err


def test_eval_data_prints_n_per_bucket(data, capsys):
    code = main(["eval", "data", "--benchmark", "jsonl", "--data", str(data), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out)
    assert 8 in [v for v in summary.values() if isinstance(v, int)]
    code = main(["eval", "data", "--benchmark", "jsonl", "--data", str(data)])
    assert code == 0 and "8 items" in capsys.readouterr().out


def test_bad_inputs_fail_in_one_line_before_a_model_loads(data, tmp_path, capsys):
    code = main(["eval", "run", "--benchmark", "jsonl", "--data", str(data), "--mode", "rgw", "--out", str(tmp_path)])
    assert code == 2 and "unknown mode 'rgw'" in capsys.readouterr().err
    code = main(["eval", "run", "--benchmark", "jsonl", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert code != 0 and "does not exist" in " ".join(capsys.readouterr().err.split())
    code = main(["eval", "run", "--benchmark", "jsonl", "--data", str(data), "--model", "openai:gpt-x", "--out",
                 str(tmp_path)])
    assert code == 1 and "needs --base-url" in " ".join(capsys.readouterr().err.split())
    code = main(["eval", "report", str(tmp_path / "nothing")])
    assert code == 2 and "no results.jsonl" in capsys.readouterr().err
