"""`run_eval` end to end on the tiny random Qwen2.5-VL (grammar-constrained, so it writes the protocol), a real
BM25 index built here and the shipped demo image index for CDIR; resume, identity checks and --force."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from medrwr.config import load_config
from medrwr.errors import CLIError, EvalRunError
from medrwr.eval.results import read_results
from medrwr.testing.benchmarks import write_fixture

DOCS = [
    ("d1", "Lung", "The lung is the organ of gas exchange shown in chest CT images."),
    ("d2", "Effusion", "A pleural effusion is fluid in the pleural space; it blunts the costophrenic angle."),
    ("d3", "Lesion", "A lesion in the right upper lobe may be a tumour or an infection."),
]


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    from medrwr.retrieval.index.corpus import Document
    from medrwr.retrieval.index.hybrid import build_index

    out = tmp_path_factory.mktemp("eval-index") / "idx"
    build_index([Document(i, t, x) for i, t, x in DOCS], out, dense=False, show_progress=False)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fixture("jsonl", tmp_path_factory.mktemp("eval-data"), n=6)


def _cfg(tiny_vlm_dir, small_index, *extra):
    return load_config("configs/tiny/eval.yaml", [f"model.name={tiny_vlm_dir}", f"retrieval.index={small_index}",
                                                  "eval.batch_size=3", *extra])


@pytest.fixture(scope="module")
def backend(tiny_vlm_dir, small_index):
    """The tiny VLM loaded once for the module (each run_eval would otherwise load it again)."""
    from medrwr.rollout.backends import build_backend

    cfg = _cfg(tiny_vlm_dir, small_index)
    return build_backend(cfg.model, cfg.rollout)


def _engines(cfg, backend):
    from medrwr.eval.modes import expand_modes
    from medrwr.eval.runner import EvalEngines

    return EvalEngines(cfg, expand_modes(cfg.eval.modes), backend=backend)


@pytest.fixture(scope="module")
def all_run(tiny_vlm_dir, small_index, data, tmp_path_factory, backend):
    from medrwr.eval.runner import run_eval

    out = tmp_path_factory.mktemp("eval-run") / "run"
    events = []
    cfg = _cfg(tiny_vlm_dir, small_index)
    summary = run_eval(cfg, "jsonl", data, out, on_progress=events.append, engines=_engines(cfg, backend))
    return out, summary, events


def test_all_modes_every_item_once_with_traces_and_verdicts(all_run):
    out, summary, events = all_run
    rows = read_results(out)
    ids = {f"q{i}" for i in range(6)}
    by_mode = {m: [r for r in rows if r["mode"] == m] for m in ("direct", "rag", "rwr", "rwr_cdir")}
    assert {m: sorted(r["id"] for r in rs) for m, rs in by_mode.items()} == {m: sorted(ids) for m in by_mode}
    assert len(rows) == 24
    for r in rows:
        assert set(r["verdict"]) >= {"correct", "parsed", "bucket"} and r["trace"]["stop_reason"]
    # direct: never a retrieval; rag: one search with the question, documents from OUR index
    assert all(r["trace"]["rounds"] == 0 and "<retrieve>" not in r["trace"]["completion_text"] for r in by_mode["direct"])
    rag = {r["id"]: r for r in by_mode["rag"]}
    assert rag["q1"]["rag"]["query"] == "Is there an effusion in image 1?"
    assert rag["q1"]["rag"]["hits"][0]["doc_id"] == "d2"
    assert rag["q1"]["rag"]["truncated"] is False  # 2 short documents fit rollout.max_inserted_tokens (64)
    assert all(r["trace"]["rounds"] == 0 for r in by_mode["rag"])
    # rwr: the loop searched the real index (one round each: rollout.max_rounds = 1)
    assert all(r["trace"]["rounds"] == 1 and r["trace"]["retrievals"][0]["error"] is None for r in by_mode["rwr"])
    # rwr_cdir: a random model is never confident, so CDIR consults a case on every item; rwr is its first answer
    rwr = {r["id"]: r for r in by_mode["rwr"]}
    for r in by_mode["rwr_cdir"]:
        cd = r["trace"]["cdir"]
        assert cd["triggered"] and cd["cases"] and cd["confidence"] < 0.8
        assert "Report:" in r["trace"]["completion_text"]
        view = rwr[r["id"]]
        assert view["derived_from"] == "rwr_cdir" and view["trace"]["answer"] == cd["first"]["answer"]
        assert view["verdict"] == r["rwr_verdict"]
        assert "Report:" not in view["trace"]["completion_text"]
    # progress: per mode a start event and one per batch of 3
    assert [(e.mode, e.done, e.total) for e in events if e.mode == "direct"] == [("direct", 0, 6), ("direct", 3, 6),
                                                                                ("direct", 6, 6)]
    assert "rwr" not in {e.mode for e in events}  # read from rwr_cdir, never run on its own


def test_run_json_records_what_the_run_is(all_run, small_index, tiny_vlm_dir):
    out, summary, _ = all_run
    info = json.loads((out / "run.json").read_text())
    assert info == json.loads(json.dumps(summary)) and info["status"] == "finished"
    ident = info["identity"]
    assert ident["decoding"]["seed"] == 0 and ident["decoding"]["constrain"] == "protocol"
    assert ident["model"]["path"] == str(tiny_vlm_dir) and len(ident["model"]["config_sha256"]) == 64
    assert ident["retrieval"]["index"] == str(small_index) and len(ident["retrieval"]["manifest_sha256"]) == 64
    assert set(ident["data"]["files"]) >= {"test.jsonl"} and ident["cdir"]["threshold"] == 0.8
    assert info["timings"]["direct"]["items"] == 6


def test_resume_does_nothing_twice_and_refuses_another_config(all_run, tiny_vlm_dir, small_index, data):
    from medrwr.eval.runner import run_eval

    out, _, _ = all_run
    before = (out / "results.jsonl").read_bytes()

    class NoEngines:  # a finished run must not load or call a model
        def get(self, mode):
            raise AssertionError(f"engine requested for {mode}")

    events = []
    run_eval(_cfg(tiny_vlm_dir, small_index), "jsonl", data, out, on_progress=events.append, engines=NoEngines())
    assert (out / "results.jsonl").read_bytes() == before
    assert {(e.done, e.total, e.skipped) for e in events} == {(0, 0, 6)}
    with pytest.raises(EvalRunError, match=r"different configuration \(decoding.max_rounds: 1 -> 2"):
        run_eval(_cfg(tiny_vlm_dir, small_index, "rollout.max_rounds=2"), "jsonl", data, out, engines=NoEngines())


def test_force_starts_over_keeping_the_old_files(tiny_vlm_dir, small_index, data, tmp_path, backend):
    from medrwr.eval.runner import run_eval

    out = tmp_path / "run"
    cfg = _cfg(tiny_vlm_dir, small_index, "eval.modes=[direct]", "eval.limit=2")
    run_eval(cfg, "jsonl", data, out, engines=_engines(cfg, backend))
    assert len(read_results(out)) == 2
    cfg2 = _cfg(tiny_vlm_dir, small_index, "eval.modes=[direct]", "eval.limit=2", "rollout.max_total_new_tokens=80")
    with pytest.raises(EvalRunError):
        run_eval(cfg2, "jsonl", data, out)
    run_eval(cfg2, "jsonl", data, out, force=True, engines=_engines(cfg2, backend))
    assert len(read_results(out)) == 2
    assert len(list(out.glob("results.jsonl.bak-*"))) == 1 and len(list(out.glob("run.json.bak-*"))) == 1
    info = json.loads((out / "run.json").read_text())
    assert info["identity"]["decoding"]["max_total_new_tokens"] == 80


def test_modes_and_prompts():
    from medrwr.eval.modes import expand_modes, question_text, system_for
    from medrwr.eval.record import EvalRecord

    assert expand_modes(["rwr_cdir", "direct"]) == ["direct", "rwr_cdir"]
    with pytest.raises(ValueError, match="unknown mode 'rgw'"):
        expand_modes("rgw")
    mcq = EvalRecord(id="1", benchmark="x", split="test", question="Q?", answer="A", answer_type="mcq",
                     options={"A": "a", "B": "b"}, images=["x.png"])
    closed = EvalRecord(id="2", benchmark="x", split="test", question="Is it?", answer="yes", answer_type="closed")
    assert system_for("rwr", mcq) is None  # the protocol's own prompt, as in training
    assert "<query>" not in system_for("direct", mcq) and "<query>" in system_for("rwr", closed)
    assert "yes or no" in system_for("direct", closed) and "letter" not in system_for("direct", closed)
    assert "Reference documents" in system_for("rag", mcq)
    q = question_text(closed, ["doc one </answer>", "doc two"])
    assert q.startswith("Reference documents:\n(1) doc one ‹/answer›\n(2) doc two") and q.endswith("Question: Is it?")


def _always_right_judge(calls: list[str]):
    """An OpenAI-compatible chat endpoint (plain Starlette) whose judge calls every answer correct."""
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):
        body = await request.json()
        calls.append(body["messages"][0]["content"])
        return JSONResponse({"id": "j", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                 "role": "assistant", "content": "<think>same</think><judge>0</judge>"}}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def test_llm_judge_decides_open_answers_is_cached_and_named_in_the_report(
        tiny_vlm_dir, small_index, tmp_path, backend, loopback_server, monkeypatch):
    from medrwr.eval.report import render
    from medrwr.eval.runner import run_eval

    monkeypatch.setenv("MEDRWR_CACHE_DIR", str(tmp_path / "cache"))
    vqa = write_fixture("vqa_rad", tmp_path / "vqa", n=8)
    calls: list[str] = []
    with loopback_server(_always_right_judge(calls)) as srv:
        cfg = _cfg(tiny_vlm_dir, small_index, "eval.modes=[direct]", f"eval.judge_url={srv.url}/v1",
                   "eval.judge_model=judge-m")
        run_eval(cfg, "vqa_rad", vqa, tmp_path / "run", engines=_engines(cfg, backend))
        rows = read_results(tmp_path / "run")
        judged = [r for r in rows if r["answer_type"] != "mcq" and not r["is_yes_no"]]
        others = [r for r in rows if r not in judged]
        assert judged and others
        answered = [r for r in judged if r["verdict"]["parsed"]]
        assert answered and all(r["verdict"]["judge"] == "judge-m" and r["verdict"]["correct"] for r in answered)
        assert all(r["verdict"]["judge"] is None for r in others)  # yes/no items keep the rule-based verdict
        assert len(calls) == len({c for c in calls}) == len({(r["question"], r["verdict"]["parsed"]) for r in answered})
        before = len(calls)
        run_eval(cfg, "vqa_rad", vqa, tmp_path / "run2", engines=_engines(cfg, backend))
        assert len(calls) == before  # every verdict came from the on-disk cache
    report = (tmp_path / "run" / "report.md")
    render([tmp_path / "run"], tmp_path / "run", plots=False)
    assert "LLM judge (open answers): `judge-m`" in report.read_text()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["identity"]["judge"]["model"] == "judge-m"


def test_judge_flags_go_together():
    from typer.testing import CliRunner

    from medrwr.cli.app import app

    res = CliRunner().invoke(app, ["eval", "run", "-b", "jsonl", "--data", ".", "--judge-url", "http://127.0.0.1:9/v1"])
    assert isinstance(res.exception, CLIError) and res.exception.code == 2
    assert "--judge-url and --judge-model go together" in str(res.exception)
    with pytest.raises(Exception, match="judge_url and eval.judge_model go together"):
        load_config(None, ["eval.judge_url=http://127.0.0.1:9/v1"])


def test_continuous_batching_refills_finished_rows_and_stores_each_item_once(
        tiny_vlm_dir, small_index, data, tmp_path, backend, monkeypatch):
    """Modes without CDIR keep eval.batch_size rows running: a finished item's row is refilled at the next turn
    boundary (one generate call then mixes a row in its second turn with a newly admitted one); each item is
    stored once, when it finishes."""
    import dataclasses

    from medrwr.eval.runner import run_eval

    calls: list[list[str]] = []
    real = backend.generate

    def generate(states, *args, **kwargs):
        ids = [s.request_id for s in states]
        out = real(states, *args, **kwargs)
        if ids.count("q2") and "q2" not in {i for c in calls for i in c}:  # q2 runs out of tokens in turn 1
            b = ids.index("q2")
            out[b] = dataclasses.replace(out[b], token_ids=out[b].token_ids[:3], logprobs=out[b].logprobs[:3],
                                         finish_reason="length", stop_string=None)
        calls.append(ids)
        return out

    monkeypatch.setattr(backend, "generate", generate)
    cfg = _cfg(tiny_vlm_dir, small_index, "eval.modes=[rwr]", "eval.batch_size=2")
    events = []
    run_eval(cfg, "jsonl", data, tmp_path / "run", on_progress=events.append, engines=_engines(cfg, backend))
    rows = read_results(tmp_path / "run")
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(6))
    assert {r["id"]: r["trace"]["stop_reason"] for r in rows}["q2"] != "answer"
    assert max(len(c) for c in calls) == 2
    seen: set[str] = set()
    mixed = []
    for c in calls:
        if set(c) & seen and set(c) - seen:
            mixed.append(c)
        seen |= set(c)
    assert mixed, calls  # the row freed by q2 was refilled while its partner was in its second turn
    assert [e.done for e in events][-1] == 6 and all(r["batch_size"] == 2 for r in rows)
