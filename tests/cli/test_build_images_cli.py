"""`medrwr index build-images` end to end: a folder of synthetic PNGs and a reports file become an image index
that `open_image_retriever` opens by path (or the demo by name) and that CDIR consults on the tiny VLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medrwr._imports import is_available
from medrwr.cli import main
from medrwr.config import load_config

REPORTS = {
    "case0.png": "Normal chest radiograph.",
    "case1.png": "Cardiomegaly: the cardiothoracic ratio is above 0.5.",
    "sub/case2.png": "Right pleural effusion blunting the costophrenic angle.",
    "case3.png": "Left apical pneumothorax with a visible pleural line.",
}


def _picture(seed: int, size: int = 64) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / size
    a = (np.sin((x * np.cos(seed) + y * np.sin(seed)) * (3 + seed) * np.pi) + 1) / 2
    a = a * 0.7 + 0.3 * np.random.default_rng(seed).random((size, size))
    return Image.fromarray((np.stack([a, np.roll(a, seed, axis=0), 1 - a], axis=-1) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("cdir-cases")
    (d / "images" / "sub").mkdir(parents=True)
    for i, name in enumerate(REPORTS):
        _picture(i).save(d / "images" / name)
    _picture(9).save(d / "images" / "unreported.png")  # in the folder, not in the reports: a note, not an error
    (d / "reports.csv").write_text("image,report\n" + "".join(f'{k},"{v}"\n' for k, v in REPORTS.items()))
    return d


@pytest.fixture(scope="module")
def built(folder):
    out = folder / "index"
    code = main(["index", "build-images", "--images", str(folder / "images"), "--reports", str(folder / "reports.csv"),
                 "--out", str(out)])
    assert code == 0
    return out


def test_build_images_writes_an_index_open_image_retriever_opens(built, folder, capsys):
    from medrwr.retrieval.open import open_image_retriever

    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["kind"] == "image-index" and manifest["num_images"] == len(REPORTS)
    cfg = load_config(None, [f"cdir.image_index={built}"])
    with open_image_retriever(cfg) as index:
        assert index.doc_count == len(REPORTS)
        [hits] = index.search_images([folder / "images" / "sub" / "case2.png"], k=2)
        assert hits[0].image_id == "case2" and hits[0].report == REPORTS["sub/case2.png"]
        assert hits[0].score == pytest.approx(1.0, abs=1e-4) and hits[1].score < hits[0].score
        assert Path(hits[0].image_path).is_file() and str(built) in hits[0].image_path  # a copy in the index


def test_build_images_reports_progress_the_unreported_image_and_the_next_step(folder, tmp_path, capsys):
    out = tmp_path / "idx"
    code = main(["index", "build-images", "--images", str(folder / "images"), "--reports",
                 str(folder / "reports.csv"), "--out", str(out)])
    io = capsys.readouterr()
    text = " ".join((io.out + io.err).split())
    assert code == 0, io.err
    assert f"{len(REPORTS)} images" in text and "encoder pixel-stats-v1" in text
    assert "1 image(s)" in text and "unreported.png" in text
    assert f"--cdir --set cdir.image_index={out}" in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left beside it


@pytest.mark.parametrize("case", ["no-folder", "no-reports", "missing-image", "undecodable", "empty-report",
                                  "no-flags", "bad-suffix"])
def test_build_images_errors_are_one_line_and_write_nothing(folder, tmp_path, capsys, case):
    images, reports = folder / "images", tmp_path / "reports.jsonl"
    rows = [{"image": "case0.png", "report": "ok"}]
    expect = ""
    if case == "no-folder":
        images, expect = tmp_path / "nope", "nope does not exist"
    elif case == "no-reports":
        reports, expect = tmp_path / "missing.jsonl", "does not exist"
    elif case == "missing-image":
        rows += [{"image": "ghost.png", "report": "x"}, {"image": "ghost2.png", "report": "y"}]
        expect = "2 report row(s) name images not found"
    elif case == "undecodable":
        images = tmp_path / "imgs"
        images.mkdir()
        _picture(0).save(images / "case0.png")
        (images / "broken.png").write_bytes(b"not a png at all")
        rows += [{"image": "broken.png", "report": "x"}]
        expect = "broken.png"
    elif case == "empty-report":
        rows += [{"image": "case1.png", "report": "  "}]
        expect = "reports.jsonl:2: row for image 'case1.png' has no 'report'"
    elif case == "bad-suffix":
        reports, expect = tmp_path / "reports.xlsx", "must be .jsonl, .json, .csv or .tsv"
    if case not in ("no-reports",):
        reports.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["index", "build-images", "--images", str(images), "--reports", str(reports), "--out", str(tmp_path / "out")]
    if case == "no-flags":
        args, expect = ["index", "build-images", "--out", str(tmp_path / "out")], "missing --images, --reports"
    code = main(args)
    err = capsys.readouterr().err
    assert code == (2 if case == "no-flags" else 1)
    assert expect in " ".join(err.split()), err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (is_available("skimage") or is_available("pydicom")),
                    reason="the demo image index needs scikit-image or pydicom")
def test_demo_index_by_name_and_by_command(cache, tmp_path, capsys):
    from medrwr.retrieval.index.images import default_demo_image_index_path
    from medrwr.retrieval.open import open_image_retriever

    with open_image_retriever(load_config(None, ["cdir.image_index=demo"])) as demo:
        assert demo.doc_count >= 2 and Path(demo.path) == default_demo_image_index_path().absolute()
    assert main(["index", "build-images", "--demo", "--out", str(tmp_path / "demo")]) == 0
    assert json.loads((tmp_path / "demo" / "manifest.json").read_text())["num_images"] == demo.doc_count
    assert main(["index", "build-images", "--demo", "--images", "x"]) == 1
    assert "--demo builds from packaged sample images" in capsys.readouterr().err


def test_missing_image_index_says_how_to_build_one(tmp_path):
    from medrwr.errors import ImageIndexError
    from medrwr.retrieval.open import open_image_retriever

    with pytest.raises(ImageIndexError, match="medrwr index build-images --images DIR"):
        open_image_retriever(load_config(None, [f"cdir.image_index={tmp_path / 'none'}"]))


def test_cdir_consults_the_built_index_on_the_tiny_vlm(built, folder, tiny_vlm_dir):
    """The worked example's last step, on the tiny VLM: a low-confidence answer re-retrieves the most similar
    indexed case from the built index, inserts its image and report, and answers again."""
    pytest.importorskip("torch")
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medrwr.retrieval.open import open_image_retriever
    from medrwr.rollout.backends.hf import HFBackend
    from medrwr.rollout.backends.processing import load_processor
    from medrwr.rollout.engine import RolloutEngine, RolloutRequest
    from medrwr.testing import FREE, ForcedTranscript

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm_dir).eval()
    proc = load_processor(tiny_vlm_dir)
    letters = [proc.tokenizer.convert_tokens_to_ids(c) for c in "ABCD"]
    script = [["<think>Look.</think>\n<answer>", FREE(1, letters), "</answer>"]]
    backend = HFBackend(model, proc, logits_processors=[ForcedTranscript(proc.tokenizer, script)], seed=0)
    cfg = load_config(None, [f"cdir.image_index={built}", "cdir.enabled=true", "cdir.threshold=1.0"])
    engine = RolloutEngine(backend, None, image_retriever=open_image_retriever(cfg), cdir=cfg.cdir)
    question = Image.open(folder / "images" / "case1.png").convert("RGB").resize((60, 60))
    (tr,) = engine.run([RolloutRequest("Which finding?", ["normal", "cardiomegaly", "effusion", "pneumothorax"],
                                       images=[question])])
    tr.check()
    assert tr.cdir.triggered and tr.cdir.cases[0].image_id == "case1"
    assert f"Report: {REPORTS['case1.png']}" in tr.completion_text
    assert tr.stop_reason == "answer" and len(tr.images) == 2


def test_ask_cdir_opens_the_built_index(built, folder, tiny_vlm_dir, capsys):
    """`ask --image X --cdir --set cdir.image_index=DIR` runs with the built index (the random VLM gives no answer,
    so the trace says why CDIR did not run)."""
    pytest.importorskip("torch")
    from medrwr.retrieval.index.corpus import Document
    from medrwr.retrieval.index.hybrid import build_index
    from medrwr.rollout.trace import RolloutTrace

    kb = build_index([Document("d1", "Cardiomegaly", "An enlarged heart.")], folder / "kb", dense=False,
                     show_progress=False)
    code = main(["ask", "Which finding?", "--option", "normal", "--option", "cardiomegaly", "--image",
                 str(folder / "images" / "case1.png"), "--model", str(tiny_vlm_dir), "--index", str(kb), "--cdir",
                 "--set", f"cdir.image_index={built}", "--set", "rollout.max_new_tokens_per_turn=4",
                 "--set", "rollout.max_total_new_tokens=4", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    tr = RolloutTrace.from_json(out.out)
    assert tr.cdir is not None and not tr.cdir.triggered and tr.cdir.reason
