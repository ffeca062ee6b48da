"""The LLM judge against a real OpenAI-compatible server on loopback that answers deterministically."""


import re
import threading

import pytest

from medrwr.errors import ConfigError
from medrwr.eval.judge_llm import LLMJudge
from medrwr.eval.record import EvalRecord
from medrwr.eval.scoring import judge


def _judge_app(seen: list[dict]):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    lock = threading.Lock()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        with lock:
            seen.append(body)
        prompt = body["messages"][0]["content"]
        gold = re.search(r"Standard answer: (.*)", prompt).group(1).strip().lower()
        user = re.search(r"User's answer: (.*)", prompt).group(1).strip().lower()
        if user == "crash":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        verdict = "0" if gold in user else "1"
        reply = f"<think>compared '{user}' with '{gold}'</think>\n<judge>{verdict}</judge>"
        return {"id": "x", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": reply}}]}

    return app


@pytest.fixture
def server(loopback_server):
    seen: list[dict] = []
    with loopback_server(_judge_app(seen)) as srv:
        yield srv, seen


def _open(answer="right", qid="o1"):
    return EvalRecord(id=qid, benchmark="vqa_rad", split="test", question="Which side?", answer=answer,
                      answer_type="open")


def test_verdicts_are_cached_on_disk(server, tmp_path):
    srv, seen = server
    with LLMJudge(f"{srv.url}/v1", "judge-m", tmp_path / "cache", retries=0) as j:
        assert j.verdict("Which side?", "right", "right frontal lobe") is True
        assert j.verdict("Which side?", "right", "left") is False
        assert len(seen) == 2 and seen[0]["model"] == "judge-m" and seen[0]["temperature"] == 0
        assert j.verdict("Which side?", "right", "right frontal lobe") is True  # from the cache
        assert len(seen) == 2
        files = list((tmp_path / "cache").rglob("*.json"))
        assert len(files) == 2 and not list((tmp_path / "cache").rglob("*.tmp-*"))
    # a new judge on the same cache makes no call; another model is another key
    with LLMJudge(srv.url + "/v1/", "judge-m", tmp_path / "cache") as j2:
        assert j2.verdicts([("Which side?", "right", "left"), ("Which side?", "right", "right")]) == [False, True]
    assert len(seen) == 3
    with LLMJudge(f"{srv.url}/v1", "judge-other", tmp_path / "cache") as j3:
        assert j3.verdict("Which side?", "right", "left") is False
    assert len(seen) == 4 and seen[-1]["model"] == "judge-other"


def test_judge_decides_open_answers_and_is_recorded(server, tmp_path):
    srv, seen = server
    with LLMJudge(f"{srv.url}/v1", "judge-m", tmp_path) as j:
        v = judge(_open(), "<think>x</think><answer>Right frontal lobe</answer>", "standard", llm_judge=j)
        assert v.correct is True and v.judge == "judge-m" and v.em == 0.0  # EM kept, correct from the judge
        assert "User's answer: Right frontal lobe" in seen[-1]["messages"][0]["content"]
        yes_no = EvalRecord(id="y", benchmark="vqa_rad", split="test", question="Is it?", answer="yes",
                            answer_type="closed", is_yes_no=True)
        n = len(seen)
        assert judge(yes_no, "yes", llm_judge=j).judge is None and len(seen) == n  # rule-scored, no call
        assert judge(_open(), "", llm_judge=j).correct is False and len(seen) == n  # nothing to judge


def test_failed_call_is_wrong_and_not_cached(server, tmp_path):
    srv, seen = server
    with LLMJudge(f"{srv.url}/v1", "judge-m", tmp_path, retries=1) as j:
        v = judge(_open(), "crash", llm_judge=j)
        assert v.correct is False and v.note == "llm judge call failed"
        assert len(seen) == 2  # retried once
        assert not list(tmp_path.rglob("*.json"))


def test_unreachable_server_and_bad_settings(tmp_path):
    with LLMJudge("http://127.0.0.1:9/v1", "m", tmp_path, retries=0, timeout=2) as j:
        assert j.verdict("q", "a", "b") is None
    with pytest.raises(ConfigError, match="--judge-url"):
        LLMJudge("127.0.0.1:8000", "m", tmp_path)
    with pytest.raises(ConfigError, match="--judge-model"):
        LLMJudge("http://127.0.0.1:8000/v1", " ", tmp_path)
