"""The chat API on a real loopback port: the official ``openai`` client (plain and streamed), SSE event order,
32 concurrent requests with malformed ones among them, a client leaving mid-stream, limits, queueing, drain.

Everything is real except what the model writes: a tiny random Qwen2.5-VL (real tokenizer, processor, image
inputs, transformers generate) scripted by ``ForcedTranscript`` to write our tags, a real BM25 index, a real
image index (pixel statistics) for CDIR, uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import httpx
import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
pytest.importorskip("bm25s")
openai = pytest.importorskip("openai")

from medrwr.config import CDIRConfig, RolloutConfig, ServerConfig  # noqa: E402
from medrwr.retrieval.index.corpus import Document  # noqa: E402
from medrwr.rollout.backends.hf import HFBackend  # noqa: E402
from medrwr.rollout.engine import RolloutEngine  # noqa: E402
from medrwr.serve.api.app import create_app  # noqa: E402
from medrwr.testing import FREE, ForcedTranscript  # noqa: E402

QUESTION = "Which disease shows consolidation on a chest film?\nA. pneumonia\nB. gout\nC. migraine\nD. asthma"
LONG_THINK = "<think>" + " ".join(["long careful reasoning"] * 120) + "</think>\n<answer>A</answer>"

DOCS = [
    Document("pna-1", "Pneumonia - imaging", "Community-acquired pneumonia shows lobar consolidation with air "
             "bronchograms on the chest radiograph.", source="synthetic"),
    Document("pna-2", "Pneumonia - treatment", "Pneumonia is treated with amoxicillin.", source="synthetic"),
    Document("gout-1", "Gout - overview", "Gout presents with a painful first metatarsophalangeal joint.",
             source="synthetic"),
    Document("mig-1", "Migraine - overview", "Migraine is a throbbing unilateral headache.", source="synthetic"),
    Document("ast-1", "Asthma - overview", "Asthma causes episodic wheeze.", source="synthetic"),
]


def _png(colour="red", size=(28, 28)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def engine(tiny_vlm_dir, tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medrwr.retrieval.index.hybrid import HybridRetriever, build_index
    from medrwr.retrieval.index.images import ImageIndex
    from medrwr.rollout.backends.processing import load_processor

    root = tmp_path_factory.mktemp("serve")
    retriever = HybridRetriever.load(build_index(DOCS, root / "kb", encoder=None, dense=False, show_progress=False))
    rows = []
    for i, colour in enumerate(["red", "green", "blue"]):
        (root / f"case{i}.png").write_bytes(_png(colour, (40, 40)))
        rows.append({"id": f"case{i}", "image": f"case{i}.png", "report": f"Report {i}: {colour} study."})
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    image_index = ImageIndex.load(ImageIndex.build(root / "manifest.jsonl", root / "images", encoder="pixel-stats"))

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm_dir).eval()
    proc = load_processor(tiny_vlm_dir)
    tok = proc.tokenizer
    letters = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
    normal = [
        "<think>Opacity on the film.</think>\n<query>pneumonia consolidation</query>\n",
        ["<think>It fits.</think>\n<answer>", FREE(1, letters), "</answer>"],
    ]

    slow_think = "<think>slow " + " ".join(["step by step"] * 25) + "</think>\n"
    slow = [slow_think + "<query>pneumonia</query>\n", slow_think + "<query>consolidation</query>\n",
            slow_think + "<query>air bronchogram</query>\n", slow_think + "<answer>A</answer>"]
    quick = ["<think>Quick.</think>\n<answer>A</answer>"]

    def choose(prompt: str):
        if "LONG" in prompt:
            return [LONG_THINK]
        return slow if "SLOW" in prompt else quick if "QUICK" in prompt else normal

    backend = HFBackend(model, proc, logits_processors=[ForcedTranscript(tok, choose=choose)], temperature=0)
    eng = RolloutEngine(backend, retriever, RolloutConfig(max_new_tokens_per_turn=512, max_total_new_tokens=512), k=2,
                        image_retriever=image_index, cdir=CDIRConfig(enabled=False, threshold=1.0))
    traces = []
    run = eng.run

    runs = []

    def recording_run(requests, **kw):  # the test's window on what the engine did
        out = run(requests, **kw)
        traces.extend(out)
        runs.append(out)
        return out

    eng.run = recording_run
    eng.recorded = traces
    eng.runs = runs
    return eng


@pytest.fixture(scope="module")
def server(engine, loopback_server):
    cfg = ServerConfig(api_batch_wait_ms=30, max_body_bytes=300_000, max_messages=8, max_images_per_request=2)
    with loopback_server(create_app(engine, cfg, model_name="tiny-vlm"), cfg) as s:
        yield s


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _user(text=QUESTION, images=()):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


# ------------------------------------------------------------------------------------------ openai client


def test_openai_client_non_streaming_carries_answer_trace_and_usage(server):
    client = _client(server)
    assert [m.id for m in client.models.list().data] == ["tiny-vlm"]
    resp = client.chat.completions.create(model="tiny-vlm", messages=_user(images=[_data_url(_png())]))
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content in ("A", "B", "C", "D")
    trace = resp.model_extra["medrwr"]
    assert trace["queries"] == ["pneumonia consolidation"] and trace["rounds"] == 1
    hits = trace["retrievals"][0]["hits"][0]
    assert hits[0]["doc_id"] == "pna-1" and hits[0]["title"] == "Pneumonia - imaging" and hits[0]["score"] > 0
    assert trace["answer"] == choice.message.content and trace["valid"] is True
    assert set(trace["option_probs"]) == set("ABCD") and 0 < trace["confidence"] <= 1
    assert trace["think"].startswith("Opacity on the film.")
    usage = resp.usage
    assert usage.completion_tokens == trace["tokens"]["model"] > 0
    assert usage.model_extra["inserted_tokens"] == trace["tokens"]["inserted"] > 0
    assert usage.prompt_tokens == trace["tokens"]["prompt"]
    two = client.chat.completions.create(model="tiny-vlm", messages=_user(), n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert all(c.model_extra["medrwr"]["valid"] for c in two.choices)
    assert two.usage.completion_tokens == sum(c.model_extra["medrwr"]["tokens"]["model"] for c in two.choices)


def test_openai_client_streaming_matches_non_streaming_and_orders_events(server):
    client = _client(server)
    messages = _user()
    plain = client.chat.completions.create(model="m", messages=messages)
    stream = client.chat.completions.create(model="m", messages=messages, stream=True)
    content, reasoning, events, finishes = "", "", [], []
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        ev = (chunk.model_extra or {}).get("medrwr_event")
        if ev:
            events.append(ev)
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    assert content == plain.choices[0].message.content
    assert finishes == ["stop"]
    assert [e["event"] for e in events] == ["medrwr.query", "medrwr.retrieval", "medrwr.trace"]
    assert events[0]["data"] == {"round": 1, "query": "pneumonia consolidation"}
    assert events[1]["data"]["hits"][0][0]["doc_id"] == "pna-1"
    assert events[2]["data"]["queries"] == plain.model_extra["medrwr"]["queries"]
    # the model's text streamed token by token, the inserted retrieve block not at all
    assert "<query>pneumonia consolidation</query>" in reasoning and "<answer>" in reasoning
    assert "<retrieve>" not in reasoning and "air bronchograms" not in reasoning


def test_raw_sse_frames_are_unnamed_chunks_ending_with_done_and_cdir_event(server):
    body = {"messages": _user("Which one?", [_data_url(_png("blue"))]), "stream": True, "medrwr_cdir": True,
            "medrwr_options": {"A": "pneumonia", "B": "gout", "C": "migraine", "D": "asthma"}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    frames = [f for f in raw.split("\n\n") if f.strip()]
    assert all(f.startswith("data: ") for f in frames)  # no named events: the openai client reads every frame
    assert frames[-1] == "data: [DONE]"
    chunks = [json.loads(f[6:]) for f in frames[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and len(c["choices"]) == 1 for c in chunks)
    names = [c["medrwr_event"]["event"] for c in chunks if "medrwr_event" in c]
    assert names[:2] == ["medrwr.query", "medrwr.retrieval"] and names[-2:] == ["medrwr.cdir", "medrwr.trace"]
    cdir = next(c["medrwr_event"]["data"] for c in chunks if c.get("medrwr_event", {}).get("event") == "medrwr.cdir")
    assert cdir["threshold"] == 1.0 and cdir["first_answer"] in "ABCD"
    assert cdir["case"]["image_id"] == "case2" and cdir["case"]["report"] == "Report 2: blue study."
    assert cdir["case"]["image"].startswith("data:image/png;base64,")
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["usage"]["total_tokens"] > 0


# ------------------------------------------------------------------------------------------ concurrency


def _malformed(i: int):
    """(description, request kwargs) of bad requests, each a different mistake."""
    big = _data_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    cases = [
        ("not json", {"content": b"{nope", "headers": {"content-type": "application/json"}}),
        ("no messages", {"json": {"messages": []}}),
        ("undecodable image", {"json": {"messages": _user(images=[big])}}),
        ("max_tokens", {"json": {"messages": _user(), "max_tokens": 100_000}}),
        ("remote image", {"json": {"messages": _user(images=["https://example.org/x.png"])}}),
        ("too many images", {"json": {"messages": _user(images=[_data_url(_png())] * 3)}}),
        ("wrong type", {"json": {"messages": "hello"}}),
        ("empty question", {"json": {"messages": _user(" ")}}),
    ]
    return cases[i % len(cases)]


def test_32_concurrent_requests_with_20_percent_malformed(server):
    bad_slots = {0, 5, 10, 15, 20, 25, 30}  # 7 of 32 (~20%), each a different mistake

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=180) as client:
            async def one(i):
                if i in bad_slots:
                    what, kw = _malformed(i // 5)
                    return i, what, await client.post("/v1/chat/completions", **kw)
                text = QUESTION.replace("Which", f"Case {i}: which")
                return i, "good", await client.post("/v1/chat/completions", json={"messages": _user(text)})

            return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(main())
    for i, what, r in results:
        assert r.status_code < 500, (what, r.text)
        body = r.json()
        if what == "good":
            assert r.status_code == 200, r.text
            t = body["medrwr"]
            assert t["valid"] and t["stop_reason"] == "answer" and t["queries"] == ["pneumonia consolidation"]
            assert body["choices"][0]["message"]["content"] == t["answer"]
        else:
            assert 400 <= r.status_code < 500, (what, r.status_code)
            assert body["error"]["message"] and body["error"]["type"] == "invalid_request_error", what
    metrics = httpx.get(server.url + "/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith("medrwr_api_batch_size_bucket")]
    le1 = next(float(x.split()[-1]) for x in sizes if 'le="1.0"' in x)
    total = next(float(x.split()[-1]) for x in sizes if 'le="+Inf"' in x)
    assert total > le1, "concurrent requests must share engine batches"
    assert 'medrwr_api_requests_total{method="POST",route="/v1/chat/completions",status="400"}' in metrics
    for name in ("medrwr_api_queue_depth", "medrwr_api_time_to_first_token_seconds_count",
                 "medrwr_api_tokens_per_second_count", "medrwr_api_retrievals_per_request_count"):
        assert name in metrics


# ------------------------------------------------------------------------------------------ disconnect


def test_client_leaving_mid_stream_stops_its_row(server, engine):
    body = {"messages": _user("LONG question?\nA. x\nB. y"), "stream": True}
    seen = 0
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if "reasoning_content" in line:
                seen += 1
                if seen == 3:
                    break  # leave: the context manager closes the connection
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        mine = [t for t in engine.recorded if t.completion_text.startswith("<think>long")]
        if mine:
            break
        time.sleep(0.05)
    assert mine, "the engine never finished the cancelled row"
    t = mine[-1]
    assert t.stop_reason == "error" and t.error.startswith("cancelled")
    assert t.num_model_tokens < 300  # the scripted think is ~370 tokens: generation stopped early
    assert "medrwr_api_cancelled_total 1.0" in httpx.get(server.url + "/metrics").text


def test_a_request_arriving_mid_batch_joins_it_at_a_turn_boundary(server, engine):
    """Continuous batching: a one-turn request sent during the first turn of a 4-turn rollout joins that engine
    batch at a turn boundary (one run call returns both traces) and is answered before the long rollout ends."""
    events: list[str] = []
    started = threading.Event()

    def slow():
        body = {"messages": _user("SLOW question?\nA. x\nB. y"), "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if "reasoning_content" in line:
                    started.set()
            events.append("slow done")

    t = threading.Thread(target=slow)
    t.start()
    assert started.wait(60), "the slow rollout never streamed a token"
    r = _client(server).chat.completions.create(model="tiny-vlm", messages=_user("QUICK question?\nA. x\nB. y"))
    events.append("short done")
    t.join(120)
    assert r.choices[0].message.content == "A"
    assert events == ["short done", "slow done"]
    joint = [out for out in engine.runs if any(x.completion_text.startswith("<think>slow") for x in out)][-1]
    assert any(x.completion_text.startswith("<think>Quick") for x in joint), "the short request ran on its own"


# ------------------------------------------------------------------------------------------ limits


@pytest.mark.parametrize("kw,status,code", [
    ({"content": b'{"messages": [' + b'{"role":"user","content":"x"},' * 20_000 + b"]}"}, 413, "body_too_large"),
    ({"json": {"messages": [{"role": "user", "content": "q"}] * 9}}, 400, "too_many_messages"),
    ({"json": {"messages": _user(), "n": 9}}, 400, "invalid_parameter"),
    ({"json": {"messages": _user(), "temperature": 3}}, 400, "invalid_parameter"),
    ({"json": {"messages": _user(images=["file:///etc/passwd"])}}, 400, "file_image_refused"),
    ({"json": {"messages": _user(images=[_data_url(_png(size=(5000, 4000)))])}}, 400, "image_too_large"),
    ({"json": {"messages": [{"role": "system", "content": "only a system message"}]}}, 400, "no_user_message"),
])
def test_limits_are_4xx_in_the_openai_error_shape(server, kw, status, code):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   headers={"content-type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]


def test_unknown_route_and_health(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "/v1/chat/completions" in r.json()["error"]["message"]
    h = httpx.get(server.url + "/healthz").json()
    assert h["status"] == "ok" and h["model"] == "tiny-vlm" and h["documents"] == len(DOCS) and h["image_index"]


def test_bearer_key_full_queue_and_drain(engine, loopback_server, monkeypatch):
    monkeypatch.setenv("MEDRWR_TEST_KEY", "s3cret")
    cfg = ServerConfig(api_key_env="MEDRWR_TEST_KEY", api_max_queue=1, api_batch_wait_ms=0)
    srv = loopback_server(create_app(engine, cfg), cfg).start()
    auth = {"Authorization": "Bearer s3cret"}
    try:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(srv.url + "/healthz").status_code == 200
        # one long request runs; one waits; the next is refused with Retry-After
        running = threading.Event()
        out = {}

        def long_request():
            body = {"messages": _user("LONG run?\nA. x\nB. y"), "stream": True}
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, headers=auth, timeout=120) as r:
                for line in r.iter_lines():
                    if "reasoning_content" in line:
                        running.set()
                out["long"] = r.status_code

        t1 = threading.Thread(target=long_request)
        t1.start()
        assert running.wait(60)

        def queued_request():
            out["queued"] = httpx.post(srv.url + "/v1/chat/completions", json={"messages": _user()}, headers=auth,
                                       timeout=120)

        t2 = threading.Thread(target=queued_request)
        t2.start()
        deadline = time.monotonic() + 30
        while httpx.get(srv.url + "/healthz").json()["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": _user()}, headers=auth, timeout=30)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "queue_full"
    finally:
        srv.stop()  # graceful: the running and the queued request finish before the server goes
    t1.join(60)
    t2.join(60)
    assert out["long"] == 200
    assert out["queued"].status_code == 200 and out["queued"].json()["medrwr"]["valid"]


def test_web_page_files_and_file_urls_under_the_allowed_root(engine, loopback_server, tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    (web / "index.html").write_text("<!doctype html><title>MedRwR</title><script src='app.js'></script>")
    (web / "app.js").write_text("console.log('hi');")
    (web / "style.css").write_text("body{}")
    images = tmp_path / "images"
    images.mkdir()
    (images / "x.png").write_bytes(_png("green"))
    cfg = ServerConfig(allow_file_root=str(images), api_batch_wait_ms=0)
    with loopback_server(create_app(engine, cfg, web_dir=web), cfg) as srv:
        page = httpx.get(srv.url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<title>MedRwR</title>" in page.text
        assert "javascript" in httpx.get(srv.url + "/app.js").headers["content-type"]
        assert httpx.get(srv.url + "/style.css").headers["content-type"].startswith("text/css")
        ok = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                        json={"messages": _user(images=[(images / "x.png").as_uri()])})
        assert ok.status_code == 200 and ok.json()["medrwr"]["valid"]
        outside = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                             json={"messages": _user(images=[(web / "index.html").as_uri()])})
        assert outside.status_code == 400 and outside.json()["error"]["code"] == "file_outside_root"


def test_text_only_policy_refuses_images_or_drops_them_with_a_warning():
    from medrwr.retrieval.service.errors import APIError
    from medrwr.serve.api.requests import check_chat
    from medrwr.serve.api.schemas import ChatRequest

    req = ChatRequest.model_validate({"messages": _user(images=[_data_url(_png())]),
                                      "medrwr_options": ["pneumonia", "gout"]})
    with pytest.raises(APIError, match="text-only") as exc:
        check_chat(req, ServerConfig(), RolloutConfig(), supports_images=False, has_image_index=False)
    assert exc.value.status == 400 and exc.value.code == "images_unsupported"
    chat, urls = check_chat(req, ServerConfig(), RolloutConfig(), supports_images=False, has_image_index=False,
                            drop_images=True)
    assert urls == [] and "1 image(s) ignored" in chat.warnings[0]
    assert chat.options == ["pneumonia", "gout"] and chat.letters() == "AB"
