"""`open_retriever`: one place that opens retrievers, one precedence rule, one contract for every retriever."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("bm25s")

from medrwr.cli import main
from medrwr.config import Config, RetrievalConfig, ServerConfig, load_config
from medrwr.retrieval.base import SEARCH_MODES, FakeRetriever, Hit, Retriever
from medrwr.retrieval.index.corpus import Document
from medrwr.retrieval.index.hybrid import HybridRetriever, build_index
from medrwr.retrieval.open import open_retriever

DOCS = [
    Document("d1", "Asthma", "Wheeze and breathlessness relieved by inhaled bronchodilators.", "toy"),
    Document("d2", "Gout", "Acute monoarthritis of the big toe with urate crystals.", "toy"),
    Document("d3", "Sepsis", "Infection with organ dysfunction; give antibiotics early.", "toy"),
    Document("d4", "Migraine", "Throbbing unilateral headache with photophobia.", "toy"),
    Document("d5", "Anaemia", "Low haemoglobin causing fatigue and pallor.", "toy"),
]
STORED = RetrievalConfig(dense=False, rrf_k=5, fusion_depth=20, bm25_weight=0.5)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    return build_index(DOCS, tmp_path_factory.mktemp("open") / "ix", STORED, dense=False, show_progress=False)


# ------------------------------------------------------------------------------------------ precedence


def test_index_settings_are_kept_unless_set(index_dir):
    cfg = load_config(None, [f"retrieval.index={index_dir}"])
    with open_retriever(cfg) as r:
        assert (r.config.rrf_k, r.config.fusion_depth, r.config.bm25_weight) == (5, 20, 0.5)
    cfg = load_config(None, [f"retrieval.index={index_dir}", "retrieval.rrf_k=9"])
    with open_retriever(cfg) as r:  # --set wins for its key only
        assert (r.config.rrf_k, r.config.fusion_depth, r.config.bm25_weight) == (9, 20, 0.5)
    with open_retriever(RetrievalConfig(index=str(index_dir))) as r:  # built in code: defaults are not choices
        assert r.config.rrf_k == 5


def test_yaml_sits_between_manifest_and_set(index_dir, tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"retrieval:\n  index: {index_dir}\n  rrf_k: 11\n  fusion_depth: 7\n", encoding="utf-8")
    with open_retriever(load_config(yaml, ["retrieval.fusion_depth=8"])) as r:
        assert (r.config.rrf_k, r.config.fusion_depth, r.config.bm25_weight) == (11, 8, 0.5)


def test_set_reaches_asks_retriever(index_dir, monkeypatch, capsys):
    import medrwr.rollout.backends as backends
    import medrwr.rollout.engine as engine_mod

    seen = {}

    def fake_engine(backend, retriever, *args, **kwargs):
        seen["retriever"] = retriever
        raise ValueError("engine captured")

    monkeypatch.setattr(backends, "build_backend", lambda *a, **kw: object())
    monkeypatch.setattr(engine_mod, "RolloutEngine", fake_engine)
    code = main(["ask", "Which?", "--index", str(index_dir), "--set", "retrieval.rrf_k=13"])
    assert code == 1 and "engine captured" in capsys.readouterr().err
    assert seen["retriever"].config.rrf_k == 13 and seen["retriever"].config.fusion_depth == 20


def test_server_keeps_the_index_settings(index_dir, monkeypatch):
    import medrwr.retrieval.service.app as app_mod
    from medrwr.retrieval.service.server import bind_socket, serve

    seen = {}

    def fake_app(retriever, image_retriever=None, config=None):
        seen["retriever"] = retriever
        raise ValueError("app captured")

    monkeypatch.setattr(app_mod, "create_app", fake_app)
    free = bind_socket("127.0.0.1", 0)
    port = free.getsockname()[1]
    free.close()
    cfg = Config(retrieval=RetrievalConfig(index=str(index_dir)), server=ServerConfig(port=port))
    with pytest.raises(ValueError, match="app captured"):
        serve(cfg)
    assert (seen["retriever"].config.rrf_k, seen["retriever"].config.fusion_depth) == (5, 20)
    cfg = load_config(None, [f"retrieval.index={index_dir}", "retrieval.rrf_k=3", f"server.port={port}"])
    with pytest.raises(ValueError, match="app captured"):
        serve(cfg)
    assert seen["retriever"].config.rrf_k == 3


def test_retrieve_with_unreachable_url_fails_naming_it(index_dir, capsys):
    url = "http://127.0.0.1:1"
    code = main(["retrieve", "gout", "--index", str(index_dir), "--set", f"retrieval.url={url}", "--set",
                 "retrieval.k=1"])
    err = capsys.readouterr().err
    assert code != 0
    assert url in " ".join(err.split()) and "cannot reach retrieval server" in " ".join(err.split())
    assert err.strip().startswith("error:")  # one message, no traceback, no local search
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------ the contract


def _check_contract(r: Retriever, n_docs: int, modes: tuple[str, ...]) -> None:
    assert isinstance(r, Retriever)
    assert r.doc_count == n_docs
    assert r.modes == modes and set(r.modes) <= set(SEARCH_MODES)
    assert r.default_mode in r.modes
    about = r.describe()
    json.dumps(about)  # JSON-able
    assert about["doc_count"] == n_docs and about["modes"] == list(modes)
    assert about["default_mode"] == r.default_mode and about["kind"]
    assert ("path" in about) or ("url" in about)
    r.warmup()
    (hits,) = r.search(["big toe urate crystals"], k=2)
    assert hits and all(isinstance(h, Hit) for h in hits) and len(hits) <= 2
    assert hits[0].doc_id == "d2"
    assert r.search([], k=1) == []
    with pytest.raises(ValueError):
        r.search(["x"], k=1, mode="sparse")
    with pytest.raises(TypeError):
        r.search("gout", k=1)


def test_hybrid_retriever_contract(index_dir):
    with HybridRetriever.load(index_dir) as r:
        _check_contract(r, len(DOCS), ("bm25",))
        assert r.describe()["path"] == str(index_dir) and r.describe()["encoder"] is None


def test_sharded_retriever_contract(index_dir, tmp_path):
    with open_retriever(RetrievalConfig(index=str(index_dir)), shards=2, shards_dir=tmp_path / "s") as r:
        _check_contract(r, len(DOCS), ("bm25",))
        assert [s["rows"] for s in r.describe()["shards"]] == [[0, 2], [2, 5]]
        assert r.config.rrf_k == 5  # the parent index's settings, as unsharded


def test_fake_retriever_contract():
    fake = FakeRetriever({d.doc_id: d.text for d in DOCS})
    _check_contract(fake, len(DOCS), SEARCH_MODES)


def test_http_client_contract(index_dir, loopback_server):
    pytest.importorskip("fastapi")
    from medrwr.retrieval.service.app import create_app

    local = HybridRetriever.load(index_dir)
    with loopback_server(create_app(local)) as srv:
        with open_retriever(load_config(None, [f"retrieval.url={srv.url}"])) as client:
            _check_contract(client, len(DOCS), ("bm25",))
            assert client.describe()["url"] == srv.url
            assert client.search(["gout"], k=1) == local.search(["gout"], k=1)
