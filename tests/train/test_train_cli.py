"""``medrwr train`` end to end on the tiny configs: stage 1, then stage 2 from stage 1's checkpoint-final,
resume after an interrupted run, ``train report``, and one-line errors for bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    from medrwr.retrieval.index.corpus import Document
    from medrwr.retrieval.index.hybrid import build_index

    rows = [json.loads(line) for line in (ROOT / "configs/tiny/data/corpus.jsonl").read_text().splitlines()]
    docs = [Document(r["id"], r["title"], r["text"]) for r in rows]
    return build_index(docs, tmp_path_factory.mktemp("kb") / "idx", dense=False, show_progress=False)


def _train(*args):
    from medrwr.cli.app import app

    result = CliRunner().invoke(app, ["train", *args], catch_exceptions=False)
    return result


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_stage1_then_stage2_then_report(tiny_vlm_dir, tiny_index, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    r = _train("--config", "configs/tiny/stage1.yaml", "--out", str(s1), "--set", f"model.name={tiny_vlm_dir}",
               "--set", f"retrieval.index={tiny_index}", "--set", "train.max_steps=2")
    assert r.exit_code == 0, r.output
    steps = [m for m in _metrics(s1) if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for key in ("reward", "kl", "accuracy", "retrieval_rate", "mean_rounds", "tokens_per_s",
                "rewards/accuracy/mean", "rewards/format/mean", "completions/clipped_ratio"):
        assert key in steps[-1], key
    final = s1 / "checkpoint-final"
    assert (final / "model.safetensors").is_file()

    r = _train("--config", "configs/tiny/stage2.yaml", "--out", str(s2), "--model", str(final),
               "--set", f"retrieval.index={tiny_index}", "--set", "train.max_steps=1")
    assert r.exit_code == 0, r.output
    last = [m for m in _metrics(s2) if "reward" in m][-1]
    assert "rewards/confidence_gain/mean" in last and "rewards/query_semantic_text/mean" in last
    from medrwr.rollout.backends.hf import load_hf_policy

    assert load_hf_policy(s2 / "checkpoint-final").supports_images

    r = _train("report", str(s1))
    assert r.exit_code == 0, r.output
    png = s1 / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _seen_questions(backend, sink):
    """Record the question of every prompt the engine renders (the data order)."""
    prepare = backend.prepare_prompt

    def recording(messages, images=()):
        content = messages[-1]["content"]
        sink.append(content if isinstance(content, str) else content[-1]["text"])
        return prepare(messages, images)

    backend.prepare_prompt = recording


@pytest.mark.slow
def test_resume_continues_with_the_same_data_order(tiny_lm_dir, tiny_index, tmp_path, monkeypatch):
    from medrwr.config import load_config
    from medrwr.rollout.backends.hf import load_hf_policy
    from medrwr.train.run import run_training

    monkeypatch.chdir(ROOT)

    def run(out, steps, seen):
        cfg = load_config("configs/tiny/stage1.yaml", [
            f"model.name={tiny_lm_dir}", f"retrieval.index={tiny_index}", f"train.max_steps={steps}",
            "train.beta=0.0", "train.per_device_batch_size=2", "rollout.max_new_tokens_per_turn=12",
            "rollout.max_total_new_tokens=12",
        ])  # one question per step, a checkpoint every 2 steps (the tiny config's save_steps)
        backend = load_hf_policy(tiny_lm_dir, temperature=1.0)
        _seen_questions(backend, seen)
        return run_training(cfg, out, backend=backend)

    full: list[str] = []
    run(tmp_path / "full", 4, full)
    first: list[str] = []
    run(tmp_path / "cut", 2, first)
    (tmp_path / "cut" / "checkpoint-final").rename(tmp_path / "cut" / "first-final")
    # a kill -9 after step 2's checkpoint leaves a metrics line for a step that never got saved: drop it on resume
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "reward": 99.0}) + "\n" + '{"step": 4, "rew')
    rest: list[str] = []
    result = run(tmp_path / "cut", 4, rest)
    assert result.resumed_from and result.resumed_from.endswith("checkpoint-2")
    assert first + rest == full, "the resumed run saw the questions in another order"
    steps = [m["step"] for m in _metrics(tmp_path / "cut") if "reward" in m]
    assert steps == [1, 2, 3, 4]
    assert all(m.get("reward") != 99.0 for m in _metrics(tmp_path / "cut"))


def test_bad_dataset_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}) + "\n")
    from medrwr.cli.app import main

    code = main(["train", "--config", "configs/tiny/stage1.yaml", "--dataset", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0
    assert "row 1" in err and "answer_idx" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
