"""The retrieval service on a real loopback port, over a real BM25 + MiniLM index (and a real image index).

Servers run in a thread, as in httpx's tests/conftest.py: uvicorn on a socket we bind ourselves
(port 0, so tests never collide), stopped with ``should_exit`` (uvicorn's graceful shutdown).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("bm25s")
pytest.importorskip("faiss")

from medrwr.config import ServerConfig
from medrwr.errors import RetrievalRequestError, RetrievalTimeout, RetrievalUnavailable
from medrwr.retrieval.base import Retriever
from medrwr.retrieval.index.corpus import Document
from medrwr.retrieval.service.app import create_app
from medrwr.retrieval.service.client import AsyncRetrievalClient, RetrievalClient
from medrwr.retrieval.service.server import bind_socket

# ------------------------------------------------------------------------------------------ corpus

_DISEASES = [
    ("myocardial infarction", "heart", "crushing chest pain radiating to the left arm", "aspirin and reperfusion"),
    ("community-acquired pneumonia", "lung", "fever, productive cough and pleuritic pain", "amoxicillin"),
    ("migraine", "brain", "throbbing unilateral headache with photophobia", "triptans"),
    ("type 2 diabetes", "pancreas", "polyuria, polydipsia and weight loss", "metformin"),
    ("appendicitis", "appendix", "periumbilical pain migrating to the right iliac fossa", "appendectomy"),
    ("hypothyroidism", "thyroid", "fatigue, cold intolerance and weight gain", "levothyroxine"),
    ("asthma", "airways", "episodic wheeze and nocturnal cough", "inhaled corticosteroids"),
    ("gout", "joint", "acute painful swelling of the first metatarsophalangeal joint", "colchicine"),
    ("iron deficiency anaemia", "blood", "pallor, fatigue and koilonychia", "oral iron"),
    ("pulmonary embolism", "lung", "sudden dyspnoea and pleuritic chest pain", "anticoagulation"),
    ("cholecystitis", "gallbladder", "right upper quadrant pain after fatty meals", "cholecystectomy"),
    ("glaucoma", "eye", "raised intraocular pressure and peripheral visual field loss", "timolol drops"),
    ("psoriasis", "skin", "silvery scaly plaques on extensor surfaces", "topical steroids"),
    ("urinary tract infection", "bladder", "dysuria, frequency and suprapubic pain", "nitrofurantoin"),
    ("parkinson disease", "brain", "resting tremor, rigidity and bradykinesia", "levodopa"),
    ("rheumatoid arthritis", "joint", "symmetric small-joint polyarthritis with morning stiffness", "methotrexate"),
]
_ASPECTS = ["overview", "diagnosis", "imaging", "treatment", "complications", "epidemiology", "prognosis", "pathology"]
_FILLER = [
    "Laboratory tests help confirm the diagnosis.",
    "Imaging findings depend on the stage of disease.",
    "Early recognition improves outcomes.",
    "Guidelines recommend individualised care.",
    "Comorbidities change the choice of therapy.",
    "Follow-up is arranged in primary care.",
]


def make_corpus(n_aspects: int = 8) -> list[Document]:
    """~130 synthetic, distinct medical passages (deterministic)."""
    rng = random.Random(7)
    docs = []
    for i, (name, organ, signs, treat) in enumerate(_DISEASES):
        for j, aspect in enumerate(_ASPECTS[:n_aspects]):
            extra = " ".join(rng.sample(_FILLER, k=rng.randint(0, 4)))
            text = (
                f"{name.capitalize()} ({aspect}): a disorder of the {organ} that presents with {signs}. "
                f"Treatment often includes {treat}. {extra} Note {i}-{j}: "
                + " ".join(rng.sample(["acute", "chronic", "adult", "paediatric", "rare", "common", "severe", "mild"], 3))
            )
            docs.append(Document(f"d{i:02d}-{j}", f"{name.title()} - {aspect}", text, source="synthetic"))
    docs.append(Document("dup-a", "Duplicate", "Identical passage about sepsis and lactate.", source="synthetic"))
    docs.append(Document("dup-b", "Duplicate", "Identical passage about sepsis and lactate.", source="synthetic"))
    return docs


QUERIES = [
    "chest pain radiating to the arm",
    "fever and productive cough",
    "headache with photophobia",
    "thirst and frequent urination",
    "right lower abdominal pain",
    "cold intolerance fatigue",
    "wheeze at night",
    "swollen big toe",
    "tremor and slow movement",
    "scaly plaques on elbows",
    "sepsis lactate",
    "what is the first-line drug for diabetes",
]


def _build(path: Path, dense: bool) -> Path:
    from medrwr.retrieval.index.hybrid import build_index

    if (path / "manifest.json").is_file():
        return path
    return build_index(make_corpus(), path, encoder="default" if dense else None, dense=dense, show_progress=False)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.getbasetemp() / "medrwr-test-server-index", dense=True)


@pytest.fixture(scope="module")
def retriever(index_dir):
    from medrwr.retrieval.index.hybrid import HybridRetriever

    r = HybridRetriever.load(index_dir)
    r.warmup()
    return r


@pytest.fixture(scope="module")
def image_index(tmp_path_factory):
    from PIL import Image

    from medrwr.retrieval.index.images import ImageIndex

    root = tmp_path_factory.mktemp("images")
    rows = []
    for i, (colour, pattern) in enumerate([("red", 0), ("green", 1), ("blue", 2), ("white", 3), ("black", 0), ("yellow", 2)]):
        img = Image.new("RGB", (48, 40), colour)
        for x in range(0, 48, 4 + pattern * 3):
            for y in range(40):
                img.putpixel((x, y), (128, 64 * pattern % 256, 30))
        img.save(root / f"case{i}.png")
        rows.append({"id": f"case{i}", "image": f"case{i}.png", "report": f"Report {i}: {colour} study, pattern {pattern}."})
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = ImageIndex.build(root / "manifest.jsonl", root / "index", encoder="pixel-stats")
    return ImageIndex.load(path)


def _png(colour: str = "red", size: tuple[int, int] = (40, 40)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()




class Wrapped(Retriever):
    """A real retriever behind the contract; subclasses change ``search``."""

    def __init__(self, inner):
        self.inner = inner

    modes = property(lambda self: self.inner.modes)
    default_mode = property(lambda self: self.inner.default_mode)
    doc_count = property(lambda self: self.inner.doc_count)

    def describe(self):
        return self.inner.describe()

    def search(self, queries, k=3, mode=None):
        return self.inner.search(queries, k=k, mode=mode)


class SlowRetriever(Wrapped):
    """Wraps a real retriever and sleeps before each batch (to make queues fill and requests linger)."""

    def __init__(self, inner, delay: float):
        super().__init__(inner)
        self.delay = delay
        self.entered = threading.Event()
        self.calls = 0

    def search(self, queries, k=3, mode=None):
        self.calls += 1
        self.entered.set()
        time.sleep(self.delay)
        return self.inner.search(queries, k=k, mode=mode)


@pytest.fixture(scope="module")
def server(retriever, image_index, loopback_server):
    with loopback_server(create_app(retriever, image_index, ServerConfig())) as s:
        yield s


def _same(got, want) -> None:
    """Hits equal: ids, texts and titles exactly, scores to float32 precision (batching may change padding)."""
    assert [[h.doc_id for h in hs] for hs in got] == [[h.doc_id for h in hs] for hs in want]
    for hs_got, hs_want in zip(got, want):
        for a, b in zip(hs_got, hs_want):
            assert (a.text, a.title, a.source) == (b.text, b.title, b.source)
            assert a.score == pytest.approx(b.score, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------------ results


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_results_equal_in_process(server, retriever, mode):
    with RetrievalClient(server.url) as client:
        for k in (1, 3, 7):
            _same(client.search(QUERIES, k=k, mode=mode), retriever.search(QUERIES, k=k, mode=mode))
    raw = httpx.post(f"{server.url}/v1/search", json={"queries": QUERIES[:2], "k": 2, "mode": mode}).json()
    assert set(raw) == {"results", "took_ms"} and raw["took_ms"] >= 0
    assert set(raw["results"][0][0]) == {"doc_id", "title", "text", "score", "source"}


def test_duplicates_and_default_mode(server, retriever):
    got = RetrievalClient(server.url).search(["sepsis lactate"], k=3)
    assert got == retriever.search(["sepsis lactate"], k=3)  # default mode = the index's
    assert sum(h.text.startswith("Identical passage") for h in got[0]) == 1


def test_async_client_equals_in_process(server, retriever):
    async def go():
        async with AsyncRetrievalClient(server.url, max_batch=5) as client:  # 12 queries -> 3 concurrent chunks
            return await client.search(QUERIES, k=4, mode="hybrid"), await client.health()

    got, health = asyncio.run(go())
    _same(got, retriever.search(QUERIES, k=4, mode="hybrid"))
    assert health["documents"] == retriever.doc_count


def test_queries_compat_route(server, retriever):
    r = httpx.post(f"{server.url}/queries", json={"queries": QUERIES[:3], "k": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["queries"] == QUERIES[:3]
    assert body["answers"] == [[h.text for h in hs] for hs in retriever.search(QUERIES[:3], k=3)]
    # the reference's default k is 3, and unknown keys from its scripts are ignored
    r = httpx.post(f"{server.url}/queries", json={"queries": ["asthma"], "return_scores": False})
    assert r.status_code == 200 and len(r.json()["answers"][0]) == 3


def test_healthz(server, retriever, image_index):
    h = httpx.get(f"{server.url}/healthz").json()
    assert h["status"] == "ok"
    assert h["documents"] == retriever.doc_count == len(make_corpus())
    assert h["encoder"] == "all-MiniLM-L6-v2"
    assert h["modes"] == ["bm25", "dense", "hybrid"]
    assert h["image_index"] is True and h["images"] == len(image_index)


def test_image_search_json_and_multipart(server, image_index):
    png = _png("blue")
    want = image_index.search_images([png], k=2)
    r = httpx.post(f"{server.url}/v1/search/image", json={"images": [base64.b64encode(png).decode()], "k": 2})
    assert r.status_code == 200, r.text
    got = [[h["image_id"] for h in hs] for hs in r.json()["results"]]
    assert got == [[h.image_id for h in hs] for hs in want]
    assert r.json()["results"][0][0]["report"] == want[0][0].report
    files = [("images", ("a.png", png, "image/png")), ("images", ("b.png", _png("white"), "image/png"))]
    r = httpx.post(f"{server.url}/v1/search/image", files=files, data={"k": "1"})
    assert r.status_code == 200, r.text
    assert [hs[0]["image_id"] for hs in r.json()["results"]] == [
        hs[0].image_id for hs in image_index.search_images([png, _png("white")], k=1)
    ]
    client_hits = RetrievalClient(server.url).search_images([png], k=2)
    assert [h.image_id for h in client_hits[0]] == [h.image_id for h in want[0]]


# ------------------------------------------------------------------------------------------ bad input

MALFORMED = [
    # (path, kwargs for httpx, expected status, words the message must contain)
    ("/v1/search", {"content": b"{not json"}, 400, "not valid JSON"),
    ("/v1/search", {"content": b""}, 400, "empty"),
    ("/v1/search", {"json": [1, 2]}, 400, "JSON object"),
    ("/v1/search", {"json": {"queries": []}}, 400, "empty"),
    ("/v1/search", {"json": {"queries": ["ok", "   "]}}, 400, "queries[1]"),
    ("/v1/search", {"json": {"queries": ["a"], "k": 0}}, 400, "k must be between"),
    ("/v1/search", {"json": {"queries": ["a"], "k": 10**6}}, 400, "k must be between"),
    ("/v1/search", {"json": {"queries": ["a"], "k": "3"}}, 400, "k"),
    ("/v1/search", {"json": {"queries": [1, None]}}, 400, "queries[0]"),
    ("/v1/search", {"json": {"queries": "just a string"}}, 400, "queries"),
    ("/v1/search", {"json": {"queries": ["x" * 1_000_000]}}, 400, "characters"),
    ("/v1/search", {"json": {"queries": ["a"] * 300}}, 400, "too many queries"),
    ("/v1/search", {"json": {"queries": ["a"], "mode": "semantic"}}, 400, "mode"),
    ("/v1/search", {"json": {"query": ["a"]}}, 400, "unknown field"),
    ("/queries", {"json": {"queries": ["a"], "k": -1}}, 400, "k must be between"),
    ("/v1/search/image", {"json": {"images": [base64.b64encode(b"not an image").decode()]}}, 400, "could not be decoded"),
    ("/v1/search/image", {"json": {"images": ["%%%"]}}, 400, "base64"),
    ("/v1/search/image", {"files": [("images", ("x.png", b"\x89PNG garbage", "image/png"))]}, 400, "could not be decoded"),
    ("/v1/search/image", {"json": {"images": []}}, 400, "empty"),
    ("/v1/nothing", {"json": {}}, 404, "no route"),
]


@pytest.mark.parametrize("path,kwargs,status,words", MALFORMED, ids=[f"{m[0]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_requests_get_clear_4xx(server, path, kwargs, status, words):
    r = httpx.post(server.url + path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"]
    assert err["type"] and err["code"]


def test_get_on_post_route_is_405_json(server):
    r = httpx.get(f"{server.url}/v1/search")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_mode_unavailable_on_bm25_only_index(tmp_path_factory, loopback_server):
    from medrwr.retrieval.index.hybrid import HybridRetriever

    r = HybridRetriever.load(_build(tmp_path_factory.getbasetemp() / "medrwr-test-bm25-index", dense=False))
    with loopback_server(create_app(r)) as s:
        bad = httpx.post(f"{s.url}/v1/search", json={"queries": ["asthma"], "mode": "dense"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "mode_unavailable"
        assert "bm25" in bad.json()["error"]["message"]
        ok = httpx.post(f"{s.url}/v1/search", json={"queries": ["asthma"], "k": 2})  # default: the index's mode
        assert ok.status_code == 200 and len(ok.json()["results"][0]) == 2
        none = httpx.post(f"{s.url}/v1/search/image", json={"images": [base64.b64encode(_png()).decode()]})
        assert none.status_code == 400 and "no image index" in none.json()["error"]["message"]


def test_body_size_limits(retriever, loopback_server):
    cfg = ServerConfig(max_body_bytes=2000)
    with loopback_server(create_app(retriever, config=cfg), cfg) as s:
        r = httpx.post(f"{s.url}/v1/search", json={"queries": ["a" * 500] * 5})  # Content-Length > limit
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: the limit is enforced while streaming
            yield b'{"queries": ["'
            for _ in range(10):
                yield b"a" * 500
            yield b'"]}'

        r = httpx.post(f"{s.url}/v1/search", content=chunks())
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        assert httpx.post(f"{s.url}/v1/search", json={"queries": ["asthma"]}).status_code == 200


def test_200_concurrent_requests_mixed_with_malformed(server, retriever):
    rng = random.Random(0)
    good, expected = [], []
    for i in range(160):
        q, k, mode = rng.choice(QUERIES), rng.randint(1, 5), rng.choice(["bm25", "dense", "hybrid"])
        good.append(("/v1/search", {"json": {"queries": [q], "k": k, "mode": mode}}))
        expected.append(retriever.search([q], k=k, mode=mode)[0])
    bad = [(p, kw) for p, kw, _, _ in MALFORMED[:19]] * 2 + [("/v1/search", {"json": {"queries": [""]}})] * 2
    jobs = [(True, i, job) for i, job in enumerate(good)] + [(False, -1, job) for job in bad]
    rng.shuffle(jobs)
    assert len(jobs) == 200

    async def run():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as c:
            return await asyncio.gather(*(c.post(path, **kw) for _, _, (path, kw) in jobs))

    metrics_before = httpx.get(f"{server.url}/metrics").text
    responses = asyncio.run(run())
    for (is_good, i, (path, kw)), r in zip(jobs, responses):
        assert r.status_code < 500, r.text
        if is_good:
            assert r.status_code == 200, r.text
            hits = r.json()["results"][0]
            assert [h["doc_id"] for h in hits] == [h.doc_id for h in expected[i]]
            assert [h["score"] for h in hits] == pytest.approx([h.score for h in expected[i]], rel=1e-5, abs=1e-6)
        else:
            assert 400 <= r.status_code < 500
            assert r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    # concurrent requests were merged: fewer retriever calls than good requests
    calls = _metric(httpx.get(f"{server.url}/metrics").text, "medrwr_retrieval_batch_size_count") - _metric(
        metrics_before, "medrwr_retrieval_batch_size_count"
    )
    assert 0 < calls < len(good)


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum a metric's samples (optionally filtered by labels) from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_metrics_content(server):
    httpx.post(f"{server.url}/v1/search", json={"queries": ["asthma", "gout"], "k": 2, "mode": "bm25"})
    httpx.post(f"{server.url}/v1/search", json={"queries": []})
    text = httpx.get(f"{server.url}/metrics").text
    assert _metric(text, "medrwr_retrieval_requests_total", route="/v1/search", status="200") >= 1
    assert _metric(text, "medrwr_retrieval_requests_total", route="/v1/search", status="400") >= 1
    assert "medrwr_retrieval_queue_depth" in text
    assert _metric(text, "medrwr_retrieval_batch_size_count", batcher="bm25") >= 1
    assert _metric(text, "medrwr_retrieval_request_seconds_count", route="/v1/search") >= 2
    assert _metric(text, "medrwr_retrieval_queries_total", mode="bm25") >= 2


# ------------------------------------------------------------------------------------------ overload, auth, lifecycle


def test_queue_full_answers_503_with_retry_after(retriever, loopback_server):
    slow = SlowRetriever(retriever, delay=0.3)
    cfg = ServerConfig(max_queue=2, max_batch_size=1, max_wait_ms=0)
    with loopback_server(create_app(slow, config=cfg), cfg) as s:

        async def burst():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                return await asyncio.gather(
                    *(c.post("/v1/search", json={"queries": [q], "k": 1}) for q in QUERIES[:10])
                )

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert 200 in codes and 503 in codes, codes
        assert set(codes) <= {200, 503}
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "queue_full"
        assert _metric(httpx.get(f"{s.url}/metrics").text, "medrwr_retrieval_rejected_total") == codes.count(503)
        # a read timeout is reported as RetrievalTimeout, carrying the batch
        with pytest.raises(RetrievalTimeout, match="did not answer") as info:
            RetrievalClient(s.url, timeout=0.1, retries=0).search(["slow query"])
        assert info.value.queries == ["slow query"]


def test_api_key(retriever, monkeypatch, loopback_server):
    monkeypatch.setenv("MEDRWR_TEST_KEY", "s3cret")
    cfg = ServerConfig(api_key_env="MEDRWR_TEST_KEY")
    with loopback_server(create_app(retriever, config=cfg), cfg) as s:
        body = {"queries": ["asthma"], "k": 1}
        missing = httpx.post(f"{s.url}/v1/search", json=body)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = httpx.post(f"{s.url}/v1/search", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(f"{s.url}/queries", json=body).status_code == 401
        assert httpx.get(f"{s.url}/metrics").status_code == 401
        assert httpx.get(f"{s.url}/healthz").status_code == 200  # health checks need no key
        ok = httpx.post(f"{s.url}/v1/search", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert RetrievalClient(s.url, api_key="s3cret").search(["asthma"], k=1) == retriever.search(["asthma"], k=1)
        with pytest.raises(RetrievalRequestError, match="API key") as info:
            RetrievalClient(s.url).search(["asthma"])
        assert info.value.status == 401 and info.value.queries == ["asthma"]
    monkeypatch.delenv("MEDRWR_TEST_KEY")
    with pytest.raises(ValueError, match="MEDRWR_TEST_KEY"):
        create_app(retriever, config=cfg)  # a named but unset key variable must not silently disable auth


def test_client_retries_until_restarted_server_answers(retriever, loopback_server):
    first = loopback_server(create_app(retriever)).start()
    port = first.port
    first.stop()
    restarted = threading.Event()
    holder = {}

    def restart_later():
        time.sleep(0.6)
        holder["server"] = loopback_server(create_app(retriever), port=port).start()
        restarted.set()

    t = threading.Thread(target=restart_later)
    t.start()
    try:
        client = RetrievalClient(f"http://127.0.0.1:{port}", retries=8, backoff=0.1, max_backoff=0.5)
        got = client.search(["swollen big toe"], k=2)
        assert restarted.is_set()  # the answer came from the restarted server
        assert got == retriever.search(["swollen big toe"], k=2)
    finally:
        t.join()
        holder["server"].stop()


def test_unreachable_server_error_names_url_and_fix():
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()  # a port nobody listens on
    client = RetrievalClient(f"http://127.0.0.1:{port}", retries=1, backoff=0.01)
    with pytest.raises(RetrievalUnavailable, match="medrwr serve retrieval") as info:
        client.search(["a", "b"])
    assert f"127.0.0.1:{port}" in str(info.value)
    assert info.value.queries == ["a", "b"]


def test_graceful_shutdown_completes_in_flight_request(retriever, loopback_server):
    slow = SlowRetriever(retriever, delay=0.8)
    s = loopback_server(create_app(slow)).start()
    result = {}

    def call():
        result["response"] = httpx.post(f"{s.url}/v1/search", json={"queries": ["gout"], "k": 2}, timeout=30)

    t = threading.Thread(target=call)
    t.start()
    assert slow.entered.wait(10)
    s.stop()  # should_exit while the request is inside the retriever
    t.join(timeout=30)
    r = result["response"]
    assert r.status_code == 200
    assert [h["doc_id"] for h in r.json()["results"][0]] == [h.doc_id for h in retriever.search(["gout"], k=2)[0]]
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{s.url}/v1/search", json={"queries": ["gout"]})


def test_one_failing_request_does_not_fail_its_batch(retriever, loopback_server):
    class Picky(Wrapped):
        def search(self, queries, k=3, mode=None):
            if any("poison" in q for q in queries):
                raise ValueError("cannot search for poison")
            time.sleep(0.05)
            return retriever.search(queries, k=k, mode=mode)

    cfg = ServerConfig(max_wait_ms=50)
    with loopback_server(create_app(Picky(retriever), config=cfg), cfg) as s:

        async def go():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                qs = ["asthma", "poison ivy", "gout"]
                return await asyncio.gather(*(c.post("/v1/search", json={"queries": [q], "k": 1}) for q in qs))

        ok1, bad, ok2 = asyncio.run(go())
        assert ok1.status_code == 200 and ok2.status_code == 200
        assert bad.status_code == 400 and "poison" in bad.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ CLI


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())  # rich wraps long lines


def test_cli_serve_retrieval_clear_errors(index_dir, tmp_path, capsys, monkeypatch):
    from medrwr.cli import main

    assert main(["serve", "retrieval", "--index", str(tmp_path / "missing")]) == 1
    assert "does not exist" in _err(capsys)
    taken = bind_socket("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        assert main(["serve", "retrieval", "--index", str(index_dir), "--port", str(port)]) == 1
        err = _err(capsys)
        assert "already in use" in err and str(port) in err
    finally:
        taken.close()
    monkeypatch.delenv("MEDRWR_UNSET_KEY", raising=False)
    assert main(["serve", "retrieval", "--index", str(index_dir), "--api-key-env", "MEDRWR_UNSET_KEY"]) == 1
    assert "MEDRWR_UNSET_KEY" in _err(capsys)
    assert main(["serve", "retrieval", "--index", str(index_dir), "--port", "70000"]) == 1
    assert "server.port" in _err(capsys)
