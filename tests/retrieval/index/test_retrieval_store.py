"""The index directory: manifest, checksums, versions, atomic builds (a failed or killed build leaves
the previous index loadable). BM25-only indexes keep these tests fast (no encoder)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from medrwr.config import RetrievalConfig
from medrwr.retrieval.index import store
from medrwr.retrieval.index.corpus import Document
from medrwr.retrieval.index.hybrid import HybridRetriever, build_index
from medrwr.retrieval.index.store import (
    FORMAT_VERSION,
    MANIFEST,
    IndexCorrupt,
    IndexMissing,
    IndexStoreError,
    IndexVersionMismatch,
    atomic_index_dir,
    load_manifest,
    write_manifest,
)

TEXTS = [
    "Asthma is a chronic airway disease with wheeze.",
    "Pneumonia is an infection of the lung.",
    "Gout is arthritis from urate crystals.",
    "Migraine is a throbbing headache with aura.",
    "Cirrhosis is scarring of the liver.",
]


def _docs(texts=TEXTS, prefix="d"):
    return [Document(f"{prefix}{i}", f"T{i}", t, "toy") for i, t in enumerate(texts)]


def _build(out: Path, docs=None) -> Path:
    return build_index(docs or _docs(), out, RetrievalConfig(), dense=False, show_progress=False)


def _top(path: Path, q: str = "liver scarring") -> str:
    return HybridRetriever.load(path).search([q], k=1, mode="bm25")[0][0].doc_id


def test_manifest_records_what_the_issue_asks(tmp_path):
    out = _build(tmp_path / "ix")
    m = load_manifest(out)
    assert m["format_version"] == FORMAT_VERSION and m["doc_count"] == 5
    assert len(m["corpus"]["sha256"]) == 64 and m["corpus"]["sources"] == {"toy": 5}
    assert m["build_config"]["stemmer"] == "english" and "created_at" in m
    assert set(m["files"]) >= {
        "docs.jsonl",
        "doc_offsets.npy",
        "bm25/data.csc.index.npy",
        "bm25/medrwr_bm25.json",
    }
    assert all(len(e["sha256"]) == 64 and e["size"] > 0 for e in m["files"].values())
    # same corpus -> same corpus hash; different corpus -> different
    m2 = load_manifest(_build(tmp_path / "ix2"))
    m3 = load_manifest(_build(tmp_path / "ix3", _docs(TEXTS[::-1])))
    assert m2["corpus"]["sha256"] == m["corpus"]["sha256"] != m3["corpus"]["sha256"]


def test_extra_manifest_is_merged(tmp_path):
    out = build_index(
        _docs(),
        tmp_path / "ix",
        dense=False,
        show_progress=False,
        extra_manifest={"attribution": "HPO (hpo.jax.org)"},
    )
    assert load_manifest(out)["attribution"] == "HPO (hpo.jax.org)"
    with pytest.raises(ValueError, match="reserved keys"):
        build_index(_docs(), tmp_path / "iy", dense=False, show_progress=False, extra_manifest={"files": {}})


def test_flipped_byte_is_a_checksum_error_naming_the_file(tmp_path):
    out = _build(tmp_path / "ix")
    f = out / "docs.jsonl"
    data = bytearray(f.read_bytes())
    data[10] = ord("X") if data[10] != ord("X") else ord("Y")
    f.write_bytes(bytes(data))  # same size, different content
    with pytest.raises(IndexCorrupt, match=r"checksum error in .*docs\.jsonl.*rebuild"):
        load_manifest(out)
    with pytest.raises(IndexCorrupt, match=r"docs\.jsonl"):
        HybridRetriever.load(out)
    load_manifest(out, verify=False)  # opt-out still reads the manifest


def test_truncated_and_missing_files(tmp_path):
    out = _build(tmp_path / "ix")
    data = out / "bm25" / "data.csc.index.npy"
    data.write_bytes(data.read_bytes()[:-4])
    with pytest.raises(IndexCorrupt, match=r"data\.csc\.index\.npy: size \d+ bytes, manifest says \d+"):
        load_manifest(out)
    data.unlink()
    with pytest.raises(IndexCorrupt, match=r"missing file bm25/data\.csc\.index\.npy"):
        load_manifest(out)


def test_manifest_problems(tmp_path):
    with pytest.raises(IndexMissing, match="does not exist"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexMissing, match="no manifest.json"):
        load_manifest(tmp_path / "empty")
    out = _build(tmp_path / "ix")
    mpath = out / MANIFEST
    m = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**m, "format_version": 999}))
    with pytest.raises(IndexVersionMismatch, match="format version 999 but this medrwr reads version 1"):
        HybridRetriever.load(out)
    mpath.write_text("{ not json")
    with pytest.raises(IndexCorrupt, match="not valid JSON"):
        load_manifest(out)
    assert issubclass(IndexCorrupt, IndexStoreError) and issubclass(IndexStoreError, ValueError)


def test_big_files_verified_by_ends_unless_full(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "QUICK_VERIFY_LIMIT", 1000)
    monkeypatch.setattr(store, "_END_BYTES", 100)
    d = tmp_path / "ix"
    d.mkdir()
    (d / "big.bin").write_bytes(bytes(range(256)) * 20)  # 5120 bytes > limit
    (d / "small.json").write_text("{}")
    m = write_manifest(d, {"doc_count": 0})
    assert "sha256_ends" in m["files"]["big.bin"] and "sha256_ends" not in m["files"]["small.json"]
    blob = bytearray((d / "big.bin").read_bytes())
    blob[2500] ^= 0xFF  # middle byte: the quick check cannot see it, the full check does
    (d / "big.bin").write_bytes(bytes(blob))
    load_manifest(d)
    with pytest.raises(IndexCorrupt, match="big.bin"):
        load_manifest(d, verify="full")
    blob[5] ^= 0xFF  # first MiB (here: first 100 bytes) is always checked
    (d / "big.bin").write_bytes(bytes(blob))
    with pytest.raises(IndexCorrupt, match="big.bin"):
        load_manifest(d)


def test_failed_build_leaves_previous_index_intact(tmp_path):
    out = _build(tmp_path / "ix")
    before = (out / MANIFEST).read_text()

    def exploding():
        yield from _docs(["Liver transplant replaces the liver."] * 3, prefix="new")
        raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        build_index(exploding(), out, dense=False, show_progress=False)
    assert (out / MANIFEST).read_text() == before
    assert _top(out) == "d4"
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]  # temp dir cleaned up

    with pytest.raises(KeyError), atomic_index_dir(out) as tmp:
        (tmp / "docs.jsonl").write_text("partial")
        raise KeyError("boom")
    assert _top(out) == "d4"


def test_successful_rebuild_replaces_index(tmp_path):
    out = _build(tmp_path / "ix")
    _build(out, _docs(["Liver scarring in hepatitis."], prefix="new"))
    assert _top(out) == "new0" and load_manifest(out)["doc_count"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]


def test_refuses_to_replace_a_directory_that_is_not_an_index(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(IndexStoreError, match="refusing to replace"):
        _build(home)
    assert (home / "thesis.tex").read_text() == "precious"


def test_interrupted_swap_is_explained(tmp_path):
    (tmp_path / ".ix.old-1234").mkdir()
    with pytest.raises(IndexMissing, match=r"previous index is at .*\.ix\.old-1234"):
        load_manifest(tmp_path / "ix")


def test_killed_build_process_leaves_previous_index(tmp_path):
    """SIGKILL a real build process half-way: the previous index still loads and answers."""
    out = _build(tmp_path / "ix")
    marker = tmp_path / "started"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from medrwr.retrieval.index.corpus import Document
        from medrwr.retrieval.index.hybrid import build_index

        def docs():
            for i in range(50):
                yield Document(f"new{{i}}", "", "Liver scarring " * 5, "new")
            Path({str(marker)!r}).write_text("x")
            time.sleep(120)  # killed here, after partial writes
            yield Document("never", "", "never", "new")

        build_index(docs(), {str(out)!r}, dense=False, show_progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None, "build process exited early"
            assert time.time() < deadline, "build process did not start"
            time.sleep(0.05)
        assert any(p.name.startswith(".ix.tmp-") for p in tmp_path.iterdir())  # partial temp dir exists
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert load_manifest(out)["doc_count"] == 5
    assert _top(out) == "d4"
    _build(out)  # the next build removes the dead build's temp dir
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ix")] == []


def test_doc_store_random_access(tmp_path):
    out = _build(tmp_path / "ix")
    ds = store.DocStore(out)
    assert len(ds) == 5 and ds.get(3).text == TEXTS[3] and ds.get(0).source == "toy"
    assert [d.doc_id for d in ds.get_many([4, 0])] == ["d4", "d0"]
    offsets = np.load(out / "doc_offsets.npy", allow_pickle=False)
    assert offsets.dtype == np.int64 and offsets[-1] == (out / "docs.jsonl").stat().st_size
    with pytest.raises(IndexError):
        ds.get(5)
    ds.close()
