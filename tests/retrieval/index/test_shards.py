"""Sharded retrieval: split a real index, search the shards, and get exactly the unsharded results.

The shard/merge logic runs in-process first (fast, always); then the same shards are deployed on a
local Ray Serve instance on loopback (2 shards + router), skipped with a reason when Ray is missing.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("bm25s")
pytest.importorskip("faiss")

from medrwr.retrieval.index.corpus import Document
from medrwr.retrieval.index.hybrid import HybridRetriever
from medrwr.retrieval.index.shards import IndexShard, merge_rankings, shard_bounds, split_index

_TOPICS = [
    ("sepsis", "infection with organ dysfunction", "lactate, cultures and early antibiotics"),
    ("stroke", "sudden focal neurological deficit", "thrombolysis within the time window"),
    ("heart failure", "breathlessness, orthopnoea and ankle oedema", "diuretics and ACE inhibitors"),
    ("pneumothorax", "sudden pleuritic pain and dyspnoea", "aspiration or chest drain"),
    ("anaphylaxis", "urticaria, wheeze and hypotension", "intramuscular adrenaline"),
    ("diabetic ketoacidosis", "vomiting, ketones and acidosis", "fluids and insulin infusion"),
    ("meningitis", "fever, neck stiffness and photophobia", "ceftriaxone"),
    ("atrial fibrillation", "irregularly irregular pulse", "rate control and anticoagulation"),
    ("cellulitis", "spreading erythema and warmth of the skin", "flucloxacillin"),
    ("hyperkalaemia", "peaked T waves on the ECG", "calcium gluconate and insulin with dextrose"),
    ("tuberculosis", "chronic cough, night sweats and weight loss", "a four-drug regimen"),
    ("pancreatitis", "epigastric pain radiating to the back", "fluids and analgesia"),
]
_SECTIONS = ["summary", "signs", "tests", "management", "follow-up", "special groups", "pitfalls"]
_WORDS = ["acute", "chronic", "adult", "child", "elderly", "rare", "common", "severe", "mild", "recurrent", "primary", "secondary"]

QUERIES = [
    "neck stiffness with fever",
    "irregular pulse",
    "adrenaline for wheeze and low blood pressure",
    "ketones and vomiting",
    "peaked T waves",
    "night sweats and cough",
    "pain radiating to the back",
    "chest drain",
    "completely unrelated words zzz",
    "lactate",
]


def make_corpus() -> list[Document]:
    rng = random.Random(3)
    docs = []
    for i, (name, signs, treat) in enumerate(_TOPICS):
        for j, section in enumerate(_SECTIONS):
            words = " ".join(rng.sample(_WORDS, rng.randint(1, 6)))
            text = f"{name.capitalize()} {section}: presents with {signs}; managed with {treat}. Typical cases: {words}."
            docs.append(Document(f"t{i:02d}-{j}", f"{name.title()} ({section})", text, source="synthetic"))
    rng.shuffle(docs)  # topics spread over every shard
    docs += [Document(f"copy-{i}", "Copy", "Exactly the same passage about lactate clearance.", "synthetic") for i in range(3)]
    return docs


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    from medrwr.retrieval.index.hybrid import build_index

    path = tmp_path_factory.getbasetemp() / "medrwr-test-distributed-index"
    if (path / "manifest.json").is_file():
        return path
    return build_index(make_corpus(), path, encoder="default", show_progress=False)


@pytest.fixture(scope="module")
def unsharded(index_dir):
    return HybridRetriever.load(index_dir)


@pytest.fixture(scope="module")
def shard_dirs(index_dir, tmp_path_factory):
    return {n: split_index(index_dir, tmp_path_factory.mktemp(f"shards{n}"), n, show_progress=False) for n in (2, 3)}


def _same(got, want) -> None:
    """Equal results: the same documents in the same order (ties included), the same scores."""
    assert [[h.doc_id for h in hs] for hs in got] == [[h.doc_id for h in hs] for hs in want]
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert (a.text, a.title, a.source) == (b.text, b.title, b.source)
            assert a.score == pytest.approx(b.score, rel=1e-6, abs=1e-7)


def test_shard_bounds():
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_bounds(5, 1) == [(0, 5)]
    with pytest.raises(ValueError, match="at most 2"):
        shard_bounds(2, 3)


def test_merge_rankings_is_global_top_by_score():
    a = [([0, 2], [5.0, 1.0])]
    b = [([7, 9, 8], [4.0, 3.0, 1.0])]
    assert merge_rankings([a, b], depth=3) == [([0, 7, 9], [5.0, 4.0, 3.0])]
    assert merge_rankings([a, b], depth=10)[0][0] == [0, 7, 9, 2, 8]  # tie at 1.0: earlier shard first (bm25s)
    assert merge_rankings([a, b], depth=10, later_shards_first=True)[0][0] == [0, 7, 9, 8, 2]  # as FAISS
    c = [([3, 1], [2.0, 2.0])]  # a shard's own order of its ties is kept
    assert merge_rankings([c, [([], [])]], depth=2)[0][0] == [3, 1]


def test_shards_are_valid_indexes_with_global_bm25_statistics(index_dir, shard_dirs, unsharded):
    from medrwr.retrieval.index.hybrid import build_index

    dirs = shard_dirs[3]
    shards = [HybridRetriever.load(d) for d in dirs]  # checksums and counts verified on load
    assert sum(s.doc_count for s in shards) == unsharded.doc_count
    rows = [json.loads((d / "manifest.json").read_text())["shard"]["rows"] for d in dirs]
    assert rows == [list(b) for b in shard_bounds(unsharded.doc_count, 3)]
    # A shard's BM25 score for its documents is the unsharded index's score for the same rows ...
    lo = rows[1][0]
    q = ["fever neck stiffness photophobia"]
    ids_s, scores_s = shards[1].bm25.search(q, shards[1].doc_count)
    ids_g, scores_g = unsharded.bm25.search(q, unsharded.doc_count)
    global_score = dict(zip(ids_g[0].tolist(), scores_g[0].tolist()))
    matched = [(row, score) for row, score in zip(ids_s[0].tolist(), scores_s[0].tolist()) if score > 0]
    assert matched
    for row, score in matched:
        assert score == pytest.approx(global_score[row + lo], rel=1e-6, abs=1e-7)
    # ... which an index built from the shard's documents alone would not give (its IDF is local).
    docs = [shards[1].get_document(i) for i in range(shards[1].doc_count)]
    local = HybridRetriever.load(build_index(docs, index_dir.parent / "local-shard-1", dense=False, show_progress=False))
    ids_l, scores_l = local.bm25.search(q, local.doc_count)
    local_score = dict(zip(ids_l[0].tolist(), scores_l[0].tolist()))
    assert any(abs(local_score[r] - global_score[r + lo]) > 1e-3 for r in local_score if local_score[r] > 0)


def test_split_is_reused(index_dir, shard_dirs, tmp_path):
    before = [(d / "manifest.json").stat().st_mtime_ns for d in shard_dirs[2]]
    again = split_index(index_dir, shard_dirs[2][0].parent, 2, show_progress=False)
    assert again == shard_dirs[2]
    assert [(d / "manifest.json").stat().st_mtime_ns for d in again] == before


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_sharded_results_equal_unsharded(shard_dirs, unsharded, n, mode):
    sharded = HybridRetriever.from_shard_dirs(shard_dirs[n])
    try:
        assert sharded.doc_count == unsharded.doc_count and sharded.modes == unsharded.modes
        for k in (1, 50):  # 50 = fusion_depth: every merged candidate matters
            _same(sharded.search(QUERIES, k=k, mode=mode), unsharded.search(QUERIES, k=k, mode=mode))
        # the de-duplication of identical passages happens after the merge, as in the unsharded index
        lactate = sharded.search(["lactate clearance"], k=4, mode=mode)[0]
        assert sum(h.text.startswith("Exactly the same") for h in lactate) <= 1
    finally:
        sharded.close()


def test_shard_rankings_use_global_rows(shard_dirs, unsharded):
    shard = IndexShard.load(shard_dirs[2][1])
    lo = shard.row_offset
    assert lo > 0
    out = shard.rankings(["irregular pulse"], 5, ["bm25"])
    rows = out["bm25"][0][0]
    assert rows and all(lo <= r < lo + shard.doc_count for r in rows)
    assert [shard.documents([r])[0]["doc_id"] for r in rows] == [unsharded.docs.raw(r)["doc_id"] for r in rows]
    with pytest.raises(ValueError, match="query vectors"):
        shard.rankings(["x"], 3, ["dense"])


def test_mismatched_shards_are_refused(shard_dirs):
    a = IndexShard.load(shard_dirs[2][0]).info()
    c = IndexShard.load(shard_dirs[3][2]).info()
    with pytest.raises(ValueError, match="not contiguous"):
        HybridRetriever(None, [a, c])


@pytest.fixture
def ray_sandbox(monkeypatch):
    """Ray's files stay in a temp dir this test removes; nothing goes to ``/tmp/ray`` or ``~/.ray``.

    The session dir (sockets, logs, Serve's files) goes under a short ``/tmp/rayXXXX`` (Unix socket paths must
    stay under 107 bytes, and pytest's ``tmp_path`` can be longer) via ``RAY_TMPDIR`` and ``_temp_dir``. Ray 2.5x
    turns token authentication on for a new local cluster and writes a generated token to ``~/.ray/auth_token``;
    handing it a token in ``RAY_AUTH_TOKEN`` keeps authentication on and the home directory untouched.
    """
    import secrets
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    home_ray = Path.home() / ".ray"
    before = {p: p.stat().st_mtime_ns for p in home_ray.rglob("*")} if home_ray.exists() else None
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    if "ray._raylet" in sys.modules:  # Ray already read its auth mode in this process: keep its processes agreeing
        monkeypatch.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    mine = f"_{os.getpid()}"
    ours_before = {p.name for p in Path("/tmp/ray").glob(f"session_*{mine}")} if Path("/tmp/ray").is_dir() else set()
    try:
        yield root / "ray"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    after = {p: p.stat().st_mtime_ns for p in home_ray.rglob("*")} if home_ray.exists() else None
    assert after == before, f"Ray wrote to {home_ray}"
    ours_after = {p.name for p in Path("/tmp/ray").glob(f"session_*{mine}")} if Path("/tmp/ray").is_dir() else set()
    assert ours_after == ours_before, "Ray wrote a session under /tmp/ray"


@pytest.mark.slow
def test_ray_serve_two_shards_equal_unsharded(shard_dirs, unsharded, loopback_server, ray_sandbox, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'medrwr[ray]'")
    # Ray waits ~20 s for its GCS server by default; on a loaded 2-core CI box it can need longer.
    monkeypatch.setenv("RAY_gcs_server_port_wait_time_s", "120")
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'medrwr[ray]'")
    from ray import serve

    from medrwr.retrieval.service.ray import deploy

    # Keep every Ray service on loopback: tests send no traffic to any other address; Ray's session dir
    # (sockets, logs) lives in the test's own temp dir (ray_sandbox).
    ray.init(address="local", include_dashboard=False, num_cpus=2, configure_logging=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", _temp_dir=str(ray_sandbox))
    try:
        assert list(ray_sandbox.glob("session_*")), "Ray's session dir is not under the test's temp dir"
        remote = deploy(shard_dirs[2])
        assert remote.doc_count == unsharded.doc_count
        assert len(remote.shards) == 2
        for mode in ("bm25", "dense", "hybrid"):
            _same(remote.search(QUERIES, k=5, mode=mode), unsharded.search(QUERIES, k=5, mode=mode))
        with pytest.raises(Exception, match="k must be a positive integer"):
            remote.search(["x"], k=0)
        # what `medrwr serve retrieval --ray` runs: our HTTP service in front of the Ray router
        _check_http_front(remote, unsharded, loopback_server)
    finally:
        serve.shutdown()
        ray.shutdown()


def _check_http_front(retriever, unsharded, loopback_server) -> None:
    import httpx

    from medrwr.retrieval.service.app import create_app
    from medrwr.retrieval.service.client import RetrievalClient

    with loopback_server(create_app(retriever)) as srv:
        health = httpx.get(f"{srv.url}/healthz").json()
        assert health["documents"] == unsharded.doc_count and health["modes"] == ["bm25", "dense", "hybrid"]
        _same(RetrievalClient(srv.url).search(QUERIES, k=3, mode="hybrid"), unsharded.search(QUERIES, k=3, mode="hybrid"))
