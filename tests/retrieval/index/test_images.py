"""Image index for CDIR: real PNG files, real FAISS, the non-learned encoder and a tiny random CLIP."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medrwr._imports import is_available
from medrwr.errors import ImageIndexError, ImageLoadError
from medrwr.retrieval.base import ImageHit, ImageRetriever
from medrwr.retrieval.encoders.image import PixelStatsEncoder, load_image_encoder
from medrwr.retrieval.index.images import ImageIndex, build_demo_image_index


def _pattern(i: int, size: int = 64) -> Image.Image:
    """Visibly different synthetic images: gradients, stripes, blobs and noise at several angles."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:size, 0:size] / size
    kind = i % 4
    if kind == 0:
        a = np.cos(i) * x + np.sin(i) * y
    elif kind == 1:
        a = (np.sin((x * np.cos(i) + y * np.sin(i)) * (4 + i) * np.pi) + 1) / 2
    elif kind == 2:
        cx, cy = rng.uniform(0.2, 0.8, 2)
        a = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (0.02 + 0.01 * i))
    else:
        a = rng.random((size, size))
    a = (a - a.min()) / max(float(np.ptp(a)), 1e-6)
    rgb = np.stack([a, np.roll(a, i, axis=0), 1 - a], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


N_IMAGES = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    (d / "img").mkdir()
    rows = []
    for i in range(N_IMAGES):
        _pattern(i).save(d / "img" / f"case{i}.png")
        rows.append({"id": f"case{i}", "image": f"img/case{i}.png", "report": f"report of case {i}"})
    (d / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture(scope="module")
def index(corpus, tmp_path_factory):
    out = ImageIndex.build(corpus / "manifest.jsonl", tmp_path_factory.mktemp("idx") / "images")
    return ImageIndex.load(out)


def test_index_implements_image_retriever(index, corpus):
    from medrwr.config import CDIRConfig
    from medrwr.retrieval.base import FakeImageRetriever
    from medrwr.retrieval.open import open_image_retriever

    assert isinstance(index, ImageRetriever)
    assert len(index) == index.doc_count == N_IMAGES
    about = index.describe()
    json.dumps(about)
    assert about == {"kind": "image-index", "doc_count": N_IMAGES, "encoder": index.encoder.name, "path": str(index.path)}
    with open_image_retriever(CDIRConfig(image_index=str(index.path))) as opened:
        assert opened.doc_count == N_IMAGES
        assert opened.search_images([corpus / "img" / "case5.png"], k=1)[0][0].image_id == "case5"
    assert open_image_retriever(CDIRConfig(), demo=False) is None  # a server without an image index
    fake = FakeImageRetriever([ImageHit("a", "a.png", "report")])
    assert isinstance(fake, ImageRetriever) and fake.doc_count == 1 and fake.describe()["doc_count"] == 1


def test_exact_duplicate_is_top1_from_path_pil_and_bytes(index, corpus):
    path = corpus / "img" / "case5.png"
    for query in (path, str(path), Image.open(path), path.read_bytes()):
        [hits] = index.search_images([query], k=1)
        assert isinstance(hits[0], ImageHit)
        assert hits[0].image_id == "case5"
        assert hits[0].report == "report of case 5"
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_hit_paths_are_absolute_copies_with_same_bytes(index, corpus):
    [hits] = index.search_images([corpus / "img" / "case2.png"], k=1)
    p = hits[0].image_path
    assert p.startswith("/") and str(index.path) in p
    assert Path(p).read_bytes() == (corpus / "img" / "case2.png").read_bytes()


def test_batched_search_keeps_query_order_and_sorts_scores(index, corpus):
    order = [7, 0, 11, 3]
    res = index.search_images([corpus / "img" / f"case{i}.png" for i in order], k=3)
    assert [r[0].image_id for r in res] == [f"case{i}" for i in order]
    for r in res:
        assert len(r) == 3
        scores = [h.score for h in r]
        assert scores == sorted(scores, reverse=True)
        assert len({h.image_id for h in r}) == 3
    # the batch gives the same answers as one query at a time
    single = [index.search_images([corpus / "img" / f"case{i}.png"], k=3)[0] for i in order]
    assert [[h.image_id for h in r] for r in single] == [[h.image_id for h in r] for r in res]


def test_k_larger_than_index_and_empty_batch(index, corpus):
    [hits] = index.search_images([corpus / "img" / "case1.png"], k=100)
    assert len(hits) == N_IMAGES
    assert index.search_images([], k=3) == []
    with pytest.raises(ValueError, match="k must be"):
        index.search_images([corpus / "img" / "case1.png"], k=0)


def test_slightly_altered_image_still_finds_its_source(index, corpus):
    img = Image.open(corpus / "img" / "case6.png").convert("RGB")
    arr = np.asarray(img).astype(np.int16)
    noisy = np.clip(arr + np.random.default_rng(0).integers(-8, 9, arr.shape), 0, 255).astype(np.uint8)
    [hits] = index.search_images([Image.fromarray(noisy).resize((80, 80))], k=1)
    assert hits[0].image_id == "case6"
    assert 0.8 < hits[0].score < 1.0


def test_bad_image_bytes_give_a_clear_error(index):
    with pytest.raises(ImageLoadError, match="cannot decode image bytes"):
        index.search_images([b"this is not an image"], k=1)


def test_missing_image_file_query(index, tmp_path):
    with pytest.raises(ImageLoadError, match="does not exist"):
        index.search_images([tmp_path / "nope.png"], k=1)


def test_manifest_with_missing_image_names_it(corpus, tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"image": "img/case0.png", "report": "ok"}) + "\n"
                 + json.dumps({"image": "img/ghost.png", "report": "missing"}) + "\n")
    with pytest.raises(ImageIndexError, match="ghost.png"):
        ImageIndex.build(m, tmp_path / "out", images_dir=corpus)
    assert not (tmp_path / "out").exists()


def test_manifest_errors_are_clear(corpus, tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"image": "img/case0.png"}) + "\n")
    with pytest.raises(ImageIndexError, match="no 'report'"):
        ImageIndex.build(m, tmp_path / "out", images_dir=corpus)
    m.write_text(json.dumps({"report": "x"}) + "\n")
    with pytest.raises(ImageIndexError, match="'image'"):
        ImageIndex.build(m, tmp_path / "out", images_dir=corpus)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    m.write_text(json.dumps({"image": str(bad), "report": "x"}) + "\n")
    with pytest.raises(ImageIndexError, match="bad.png"):
        ImageIndex.build(m, tmp_path / "out", images_dir=tmp_path)


def test_csv_manifest_and_referenced_images(corpus, tmp_path):
    m = tmp_path / "m.csv"
    with open(m, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "report"])
        w.writeheader()
        for i in (1, 4, 9):
            w.writerow({"image": f"img/case{i}.png", "report": f"r{i}"})
    out = ImageIndex.build(m, tmp_path / "idx", images_dir=corpus, copy_images=False)
    idx = ImageIndex.load(out)
    assert not (out / "images").exists()
    [hits] = idx.search_images([corpus / "img" / "case4.png"], k=1)
    assert (hits[0].image_id, hits[0].report) == ("case4", "r4")
    assert hits[0].image_path == str((corpus / "img" / "case4.png").resolve())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoder"] == "pixel-stats-v1" and manifest["num_images"] == 3


def test_pixel_stats_is_image_only():
    enc = load_image_encoder("pixel-stats")
    assert isinstance(enc, PixelStatsEncoder) and enc.joint is False
    v = enc.encode_images([_pattern(1), _pattern(2)])
    assert v.shape == (2, enc.dim) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="joint image-text encoder"):
        enc.encode_texts(["cardiomegaly"])


def test_unknown_encoder_spec_lists_options():
    with pytest.raises(ImageIndexError, match="pixel-stats.*hf:.*open_clip"):
        load_image_encoder("no-such-encoder")


def test_load_rejects_other_encoder_and_non_index(index, tmp_path):
    class Other(PixelStatsEncoder):
        name = "other-v1"

    with pytest.raises(ImageIndexError, match="built with encoder 'pixel-stats-v1'"):
        ImageIndex.load(index.path, encoder=Other())


def test_tampered_index_is_rejected(corpus, tmp_path):
    from medrwr.errors import IndexCorrupt

    out = ImageIndex.build(corpus / "manifest.jsonl", tmp_path / "idx")
    emb = np.load(out / "embeddings.npy")
    emb[0, 0] += 1.0
    np.save(out / "embeddings.npy", emb)
    with pytest.raises(IndexCorrupt):
        ImageIndex.load(out)


@pytest.fixture(scope="module")
def tiny_clip_dir(cache):
    pytest.importorskip("transformers")
    from medrwr.testing import tiny_clip

    return tiny_clip()


def test_tiny_clip_gives_normalised_joint_embeddings(tiny_clip_dir):
    from transformers import AutoConfig

    enc = load_image_encoder(f"hf:{tiny_clip_dir}")
    assert enc.joint is True
    assert enc.dim == AutoConfig.from_pretrained(tiny_clip_dir).projection_dim
    img = enc.encode_images([_pattern(0), _pattern(3), _pattern(0)])
    txt = enc.encode_texts(["enlarged heart on chest x-ray", "normal chest"])
    assert img.shape == (3, enc.dim) and txt.shape == (2, enc.dim)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(img[0], img[2], atol=1e-5)
    # texts and images live in one space: cosine scores are defined between them
    assert np.all(np.abs(img @ txt.T) <= 1.0 + 1e-5)


def test_index_with_tiny_clip_reloads_encoder_from_manifest(corpus, tiny_clip_dir, tmp_path):
    out = ImageIndex.build(corpus / "manifest.jsonl", tmp_path / "clip-idx", encoder=f"hf:{tiny_clip_dir}")
    idx = ImageIndex.load(out)  # encoder spec read from the manifest
    assert idx.encoder.joint
    hits = idx.search_images([(corpus / "img" / "case3.png").read_bytes()], k=N_IMAGES)[0]
    # a random CLIP may put distinct images close together, but the duplicate scores 1 and ranks first
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert "case3" in {h.image_id for h in hits if h.score >= hits[0].score - 1e-5}


@pytest.mark.skipif(not (is_available("skimage") or is_available("pydicom")),
                    reason="demo image index needs scikit-image or pydicom installed")
def test_demo_index_from_real_images(tmp_path):
    out = build_demo_image_index(tmp_path / "demo")
    idx = ImageIndex.load(out)
    assert len(idx) >= 2
    paths = [h for h in (idx._abs(it) for it in idx.items)]
    res = idx.search_images(paths, k=1)
    assert [r[0].image_id for r in res] == [it["image_id"] for it in idx.items]
    assert all(r[0].report for r in res)


def test_reports_file_formats_and_column_aliases(corpus, tmp_path):
    """Every format `medrwr index build-images --reports` takes reads to the same cases."""
    from medrwr.retrieval.index.images import read_image_manifest

    want = [("case1", "img/case1.png", "r1"), ("case4", "img/case4.png", "r4")]
    files = {
        "a.jsonl": "".join(json.dumps({"image": i, "report": r}) + "\n" for _, i, r in want),
        "b.json": json.dumps({i: r for _, i, r in want}),  # {image: report}
        "c.json": json.dumps([{"file": i, "caption": r} for _, i, r in want]),  # aliases
        "d.tsv": "filename\tfindings\n" + "".join(f"{i}\t{r}\n" for _, i, r in want),
        "e.csv": "\ufeffpath,text,view\n" + "".join(f"{i},{r},PA\n" for _, i, r in want),  # BOM + metadata column
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        cases = list(read_image_manifest(tmp_path / name))
        assert [(c.image_id, c.image, c.report) for c in cases] == want, name
    assert [c.metadata for c in read_image_manifest(tmp_path / "e.csv")] == [{"view": "PA"}, {"view": "PA"}]
    out = ImageIndex.build(tmp_path / "b.json", tmp_path / "idx", images_dir=corpus)
    assert ImageIndex.load(out).search_images([corpus / "img" / "case4.png"], k=1)[0][0].report == "r4"


def test_reports_file_without_an_image_column_or_rows(tmp_path, corpus):
    from medrwr.retrieval.index.images import read_image_manifest

    m = tmp_path / "m.csv"
    m.write_text("picture,report\na.png,x\n")
    with pytest.raises(ImageIndexError, match="no image column; name it 'image'"):
        list(read_image_manifest(m))
    m.write_text("image,report\n")
    with pytest.raises(ImageIndexError, match="has no rows"):
        ImageIndex.build(m, tmp_path / "out", images_dir=corpus)
    with pytest.raises(ImageIndexError, match="images folder .* does not exist"):
        ImageIndex.build(corpus / "manifest.jsonl", tmp_path / "out", images_dir=tmp_path / "nope")
    assert not (tmp_path / "out").exists()


def test_image_files_lists_images_by_suffix(corpus, tmp_path):
    from medrwr.retrieval.index.images import image_files

    (tmp_path / "a.PNG").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "b.png").write_bytes(b"x")
    assert [p.name for p in image_files(tmp_path)] == ["a.PNG"]
    assert len(image_files(corpus)) == N_IMAGES
