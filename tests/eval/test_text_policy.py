"""An OpenAI-compatible chat model as the policy (``openai:MODEL``): the loop at the text level against a small
scripted chat-completions server on 127.0.0.1, with a real BM25 index; then `medrwr eval run --mode all`."""

from __future__ import annotations

import json
import re

import pytest

fastapi = pytest.importorskip("fastapi")

from medrwr.cli import main
from medrwr.config import RolloutConfig
from medrwr.eval.text_policy import ChatPolicyEngine
from medrwr.rollout.request import RolloutRequest
from medrwr.testing.benchmarks import write_fixture

DOCS = [
    ("d1", "Effusion", "A pleural effusion blunts the costophrenic angle."),
    ("d2", "Lung", "The lung is the organ of gas exchange."),
]


def scripted_app(log: list[dict]):
    """Answers like a chat model that searches once, then answers; strips the stop string as OpenAI does."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        log.append(body)
        msgs = body["messages"]
        seen = json.dumps(msgs[1:])  # the system prompt names the tags; look at the conversation only
        if "<retrieve>" not in seen and "Reference documents" not in seen and "<query>" in msgs[0]["content"]:
            text = "<think>I should check.</think>\n<query>pleural effusion angle"  # '</query>' stripped
        else:
            options = re.findall(r"\n([A-J])\. ", seen.replace("\\n", "\n"))
            text = "<think>Done.</think>\n<answer>" + ("B" if options else "no")  # '</answer>' stripped
        return {"id": "c1", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}}

    return app


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    from medrwr.retrieval.index.corpus import Document
    from medrwr.retrieval.index.hybrid import build_index

    out = tmp_path_factory.mktemp("tp-index") / "idx"
    build_index([Document(i, t, x) for i, t, x in DOCS], out, dense=False, show_progress=False)
    return out


@pytest.mark.parametrize("continuation", ["turns", "prefill"])
def test_text_level_loop_retrieves_and_continues(loopback_server, small_index, continuation):
    from medrwr.retrieval.index.hybrid import HybridRetriever

    log: list[dict] = []
    with loopback_server(scripted_app(log)) as server, HybridRetriever.load(small_index) as retriever:
        engine = ChatPolicyEngine("openai:scripted", server.url + "/v1", retriever, RolloutConfig(max_rounds=2),
                                  k=1, continuation=continuation)
        traces = engine.run([RolloutRequest("Which sign?", {"A": "air", "B": "blunted angle"}),
                             RolloutRequest("Is it normal?")])
        engine.close()
    mcq, closed = traces
    assert mcq.answer == "B" and mcq.choice == "B" and closed.answer == "no"
    for tr in traces:
        assert tr.stop_reason == "answer" and tr.valid and tr.rounds == 1
        assert tr.queries == ["pleural effusion angle"] and tr.retrievals[0].hits[0][0].doc_id == "d1"
        assert tr.confidence is None and tr.prompt_ids == [] and tr.metadata["text_level"] is True
        assert "<query>pleural effusion angle</query>\n<retrieve>\n(1) A pleural effusion blunts" in tr.completion_text
    assert len(log) == 4 and all(b["stop"] == ["</query>", "</answer>"] and b["model"] == "scripted" for b in log)
    second = [b for b in log if "<retrieve>" in json.dumps(b["messages"][1:])]
    assert len(second) == 2
    for body in second:
        last = body["messages"][-1]
        if continuation == "turns":  # the retrieve block arrives as a user turn after the assistant's query
            assert last["role"] == "user" and last["content"].startswith("\n<retrieve>\n(1) A pleural effusion")
            assert body["messages"][-2] == {"role": "assistant", "content": "<think>I should check.</think>\n"
                                            "<query>pleural effusion angle</query>"}
            assert "continue_final_message" not in body
        else:  # the assistant message is continued after the inserted block
            assert last["role"] == "assistant" and last["content"].endswith("</retrieve>\n")
            assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


def test_eval_run_mode_all_with_an_openai_policy(loopback_server, small_index, tmp_path, capsys):
    data = write_fixture("jsonl", tmp_path / "data", n=3)
    log: list[dict] = []
    out = tmp_path / "run"
    with loopback_server(scripted_app(log)) as server:
        code = main(["eval", "run", "--benchmark", "jsonl", "--data", str(data), "--model", "openai:scripted",
                     "--base-url", server.url + "/v1", "--mode", "all", "--index", str(small_index), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 0, err
        code = main(["eval", "run", "--benchmark", "jsonl", "--data", str(data), "--model", "openai:scripted",
                     "--base-url", server.url + "/v1", "--mode", "rwr_cdir", "--out", str(out)])
        assert code == 1 and "text-level" in capsys.readouterr().err
        args = ["eval", "run", "--benchmark", "jsonl", "--data", str(data), "--model", "openai:scripted", "--base-url",
                server.url + "/v1", "--mode", "direct", "--out", str(out2 := tmp_path / "run2"), "--no-plots"]
        assert main(args) == 0 and main([*args, "--set", "rollout.max_total_new_tokens=3000"]) == 1
        assert "different configuration" in " ".join(capsys.readouterr().err.split())
        assert main([*args, "--set", "rollout.max_total_new_tokens=3000", "--force"]) == 0
        assert len(list(out2.glob("results.jsonl.bak-*"))) == 1
        assert main([*args, "--set", "rollout.max_total_new_tokens=3000", "--resume"]) == 0
        assert len((out2 / "results.jsonl").read_text().splitlines()) == 3
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted({r["mode"] for r in rows}) == ["direct", "rag", "rwr"]  # rwr_cdir needs log-probs: skipped
    assert len(rows) == 9
    rwr = [r for r in rows if r["mode"] == "rwr"]
    assert all(r["trace"]["rounds"] == 1 for r in rwr)
    mcq = next(r for r in rwr if r["answer_type"] == "mcq")
    assert mcq["verdict"]["correct"] is True and mcq["verdict"]["parsed"] == "B"
    direct_sys = next(b for b in log if "<query>" not in b["messages"][0]["content"])
    assert "search" not in direct_sys["messages"][0]["content"].lower()
    info = json.loads((out / "run.json").read_text())
    assert info["identity"]["model"]["backend"] == "openai-chat"
    assert "Authorization" not in json.dumps(info)


@pytest.mark.parametrize("name", ["vqa_rad", "slake", "path_vqa", "pmc_vqa", "omnimedvqa", "mmmu", "medxpertqa",
                                  "ecbench", "jsonl"])
def test_every_benchmark_fixture_runs_and_reports(name, loopback_server, small_index, tmp_path, capsys):
    """Each loader's synthetic fixture through `eval data`, `eval run --mode all` and `eval report` (the chat
    policy keeps this fast; the tiny-VLM runs are in test_runner.py)."""
    from medrwr.eval import datasets

    data = write_fixture(name, tmp_path / "data", n=4)
    n = len(datasets.load(name, str(data)))
    assert main(["eval", "data", "--benchmark", name, "--data", str(data), "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    with loopback_server(scripted_app([])) as server:
        code = main(["eval", "run", "--benchmark", name, "--data", str(data), "--model", "openai:scripted",
                     "--base-url", server.url + "/v1", "--mode", "all", "--index", str(small_index), "--out",
                     str(out), "--no-plots"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * n and {r["benchmark"] for r in rows} == {name}
    assert all(r["verdict"]["bucket"] in ("mcq", "yes_no", "closed", "open", "unparsed") for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["benchmark"] == name and metrics["modes"]["rwr"]["overall"]["n"] == n
    assert "| run | rwr |" in (out / "report.md").read_text()
