"""The retrieval clients' retry policy and answer checking, against scripted transports.

A real server cannot be made to send garbage, so these tests use ``httpx.MockTransport`` (as httpx's
own tests do); everything a real server can do is tested on loopback in test_retrieval_server.py.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import time

import httpx
import pytest

from medrwr.errors import (
    BadRetrievalResponse,
    RetrievalError,
    RetrievalRequestError,
    RetrievalTimeout,
    RetrievalUnavailable,
)
from medrwr.retrieval.base import Hit
from medrwr.retrieval.service.client import AsyncRetrievalClient, RetrievalClient, _retry_after

URL = "http://retrieval.test"


def _hits_for(queries, k):
    return [[{"doc_id": f"{q}-{i}", "title": "", "text": f"text {q} {i}", "score": 1.0 / (i + 1), "source": "s"}
             for i in range(k)] for q in queries]


class Script:
    """A transport handler answering from a list of canned outcomes, recording requests."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        if callable(outcome):  # a factory: a fresh Response per request (sync and async streams differ)
            return outcome()
        if outcome == "echo":
            body = json.loads(request.content)
            return httpx.Response(200, json={"results": _hits_for(body["queries"], body["k"]), "took_ms": 1.0})
        return outcome


def _clients(script, **kw):
    """The same settings for the sync and the async client; returns a function running `search`."""
    kw.setdefault("backoff", 0.001)
    kw.setdefault("max_backoff", 0.005)

    def sync(queries, **skw):
        with RetrievalClient(URL, transport=httpx.MockTransport(script), **kw) as c:
            return c.search(queries, **skw)

    def asyn(queries, **skw):
        async def go():
            async with AsyncRetrievalClient(URL, transport=httpx.MockTransport(script), **kw) as c:
                return await c.search(queries, **skw)

        return asyncio.run(go())

    return {"sync": sync, "async": asyn}


@pytest.fixture(params=["sync", "async"])
def flavour(request):
    return request.param


def test_request_shape_and_parsing(flavour):
    script = Script("echo")
    got = _clients(script, api_key="tok")[flavour](["q1", "q2"], k=2, mode="bm25")
    assert got == [[Hit.from_dict(h) for h in hs] for hs in _hits_for(["q1", "q2"], 2)]
    (req,) = script.requests
    assert req.url.path == "/v1/search"
    assert req.headers["authorization"] == "Bearer tok"
    assert json.loads(req.content) == {"queries": ["q1", "q2"], "k": 2, "mode": "bm25"}


def test_big_batches_are_chunked_in_order(flavour):
    script = Script("echo")
    queries = [f"q{i}" for i in range(7)]
    got = _clients(script, max_batch=3)[flavour](queries, k=1)
    assert [hs[0].doc_id for hs in got] == [f"q{i}-0" for i in range(7)]
    assert sorted(len(json.loads(r.content)["queries"]) for r in script.requests) == [1, 3, 3]


def test_retries_on_503_and_connection_errors_then_succeeds(flavour):
    script = Script(
        httpx.ConnectError("refused"),
        httpx.Response(503, json={"error": {"message": "busy", "type": "overloaded_error", "code": "queue_full"}}),
        httpx.Response(429, headers={"Retry-After": "0"}),
        httpx.RemoteProtocolError("server went away"),
        "echo",
    )
    got = _clients(script, retries=4)[flavour](["q"], k=1)
    assert got[0][0].doc_id == "q-0" and len(script.requests) == 5


def test_gives_up_with_unavailable_after_retries(flavour):
    script = Script(httpx.Response(503, json={"error": {"message": "queue is full"}}))
    with pytest.raises(RetrievalUnavailable, match="stayed busy.*queue is full") as info:
        _clients(script, retries=2)[flavour](["a", "b"], k=1)
    assert len(script.requests) == 3 and info.value.queries == ["a", "b"]
    script = Script(httpx.ConnectError("refused"))
    with pytest.raises(RetrievalUnavailable, match=r"cannot reach retrieval server at http://retrieval\.test.*--index DIR"):
        _clients(script, retries=1)[flavour](["a"], k=1)


def test_read_timeout_is_not_retried(flavour):
    script = Script(httpx.ReadTimeout("slow"), "echo")
    with pytest.raises(RetrievalTimeout, match="did not answer") as info:
        _clients(script, retries=3, timeout=2.0)[flavour](["a"], k=1)
    assert len(script.requests) == 1 and info.value.queries == ["a"]


@pytest.mark.parametrize(
    "response,match",
    [
        (lambda: httpx.Response(200, text="<html>hello</html>"), "not JSON"),
        (lambda: httpx.Response(200, json={"answers": [["x"]]}), "expected 'results'"),
        (lambda: httpx.Response(200, json={"results": [[]]}), "answered 1 lists for 2 queries"),
        (lambda: httpx.Response(200, json={"results": [[{"title": "no id"}], []]}), "malformed hit"),
        (lambda: httpx.Response(500, json={"error": {"message": "boom"}}), "failed .HTTP 500.: boom"),
    ],
)
def test_bad_answers_raise_bad_response(flavour, response, match):
    with pytest.raises(BadRetrievalResponse, match=match) as info:
        _clients(Script(response), retries=0)[flavour](["a", "b"], k=1)
    assert info.value.queries == ["a", "b"]


def test_4xx_raises_request_error_with_server_message(flavour):
    body = {"error": {"message": "k must be between 1 and 100", "type": "invalid_request_error", "code": "k_out_of_range"}}
    with pytest.raises(RetrievalRequestError, match="k must be between") as info:
        _clients(Script(httpx.Response(400, json=body)))[flavour](["a"], k=1000)
    assert info.value.status == 400 and info.value.code == "k_out_of_range"
    assert isinstance(info.value, RetrievalError)


def test_retry_after_is_honoured(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", lambda s: slept.append(s))
    script = Script(httpx.Response(503, headers={"Retry-After": "2"}), "echo")
    with RetrievalClient(URL, transport=httpx.MockTransport(script), backoff=0.01, max_backoff=30) as c:
        assert c.search(["q"], k=1)[0][0].doc_id == "q-0"
    assert slept and slept[0] >= 2.0


def test_retry_after_parsing():
    assert _retry_after("3") == 3.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    future = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= _retry_after(future) <= 61


def test_search_images_encodes_bytes_paths_and_pil(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (4, 4), "red")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    png = buf.getvalue()
    path = tmp_path / "a.png"
    path.write_bytes(png)
    seen = []

    def handler(request):
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(200, json={"results": [[{"image_id": f"i{j}", "image_path": "p", "report": "r", "score": 0.5}]
                                                     for j in range(len(body["images"]))]})

    with RetrievalClient(URL, transport=httpx.MockTransport(handler)) as c:
        hits = c.search_images([png, str(path), img], k=1)
    assert [h[0].image_id for h in hits] == ["i0", "i1", "i2"]
    decoded = [base64.b64decode(s) for s in seen[0]["images"]]
    assert decoded[0] == png and decoded[1] == png
    assert Image.open(io.BytesIO(decoded[2])).size == (4, 4)
    with pytest.raises(ValueError, match="cannot read image file"):
        RetrievalClient(URL).search_images([str(tmp_path / "missing.png")])


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="url must look like"):
        RetrievalClient("localhost:8321")
    with pytest.raises(TypeError, match=r"queries\[1\] must be a string"):
        RetrievalClient(URL, transport=httpx.MockTransport(Script("echo"))).search(["a", 3])  # type: ignore[list-item]
    assert RetrievalClient(URL).search([]) == []
