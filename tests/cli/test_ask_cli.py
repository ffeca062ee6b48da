"""`medrwr ask` and building an engine from config, on the tiny VLM with a real (BM25) index."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from medrwr.cli import main
from medrwr.config import load_config
from medrwr.rollout.trace import RolloutTrace

DOCS = [
    ("d1", "Pneumonia", "Lobar pneumonia shows consolidation with air bronchograms on chest radiographs."),
    ("d2", "Pneumothorax", "A pneumothorax shows a visceral pleural line without lung markings."),
    ("d3", "Effusion", "Pleural effusion blunts the costophrenic angle."),
]


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    from medrwr.retrieval.index.corpus import Document
    from medrwr.retrieval.index.hybrid import build_index

    out = tmp_path_factory.mktemp("rollout-index") / "idx"
    build_index([Document(i, t, x) for i, t, x in DOCS], out, dense=False, show_progress=False)
    return out


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "xray.png"
    Image.fromarray((np.random.RandomState(0).rand(56, 56, 3) * 255).astype("uint8")).save(path)
    return path


BUDGET = ["--set", "rollout.max_new_tokens_per_turn=6", "--set", "rollout.max_total_new_tokens=6"]


def test_ask_runs_the_loop_on_a_local_vlm(tiny_vlm_dir, small_index, png, capsys):
    code = main(["ask", "Which finding?\nA. pneumonia\nB. effusion", "--image", str(png), "--model",
                 str(tiny_vlm_dir), "--index", str(small_index), "--json", *BUDGET])
    out = capsys.readouterr()
    assert code == 0, out.err
    trace = RolloutTrace.from_json(out.out)
    assert trace.images == [str(png)]
    assert 151655 in trace.prompt_ids  # the image's placeholder tokens are in the prompt
    # the budget is 6 model tokens in all, and a random model neither closes an answer nor stops early here
    assert trace.num_model_tokens == 6 and trace.stop_reason == "max_tokens" and trace.answer is None
    trace.check()

    code = main(["ask", "Which finding?", "--option", "pneumonia", "--option", "effusion", "--image", str(png),
                 "--model", str(tiny_vlm_dir), "--index", str(small_index), *BUDGET])
    out = capsys.readouterr()
    assert code == 0, out.err
    # the rendered trace shows the same run: why it stopped and the token accounting
    assert "max_tokens" in out.out
    assert "6 model, 0 inserted" in out.out


def test_ask_with_an_image_needs_a_vlm(tiny_lm_dir, png, capsys):
    code = main(["ask", "What is shown?", "--image", str(png)])  # default policy: SmolLM2, text-only
    err = " ".join(capsys.readouterr().err.split())  # rich wraps lines
    assert code == 1
    assert "vision-language model" in err and "--model Qwen/Qwen2.5-VL-7B-Instruct" in err and "SmolLM2" in err
    code = main(["ask", "What is shown?", "--image", str(png), "--model", str(tiny_lm_dir)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and "text-only" in err and "--model Qwen/Qwen2.5-VL-7B-Instruct" in err


def test_unreadable_policy_config_is_unknown_not_text_only():
    from medrwr.rollout.backends import policy_supports_images

    assert policy_supports_images(None) is False  # the packaged SmolLM2
    assert policy_supports_images("no-such-org/no-such-model-medrwr") is None  # offline: loading will say why


def test_ask_missing_image_file(capsys, tmp_path):
    code = main(["ask", "Q?", "--image", str(tmp_path / "nope.png")])
    assert code == 1 and "does not exist" in " ".join(capsys.readouterr().err.split())


def test_engine_from_config_retrieves_from_a_real_index(tiny_vlm_dir, small_index, png):
    """The config path end to end with a forced transcript: the real BM25 index answers the query."""
    from medrwr.rollout.engine import RolloutRequest, engine_from_config
    from medrwr.testing import ForcedTranscript

    cfg = load_config(None, [f"model.name={tiny_vlm_dir}", f"retrieval.index={small_index}", "retrieval.k=2"])
    engine = engine_from_config(cfg)
    tok = engine.tokenizer
    engine.backend.logits_processors.append(
        ForcedTranscript(tok, ["<think>Check.</think>\n<query>pleural line pneumothorax</query>",
                               "<think>Ok.</think>\n<answer>B</answer>"])
    )
    (tr,) = engine.run([RolloutRequest("Which?", ["a", "b"], images=[str(png)])])
    assert tr.stop_reason == "answer" and tr.valid and tr.choice == "B"
    (rec,) = tr.retrievals
    assert rec.error is None and rec.hits[0][0].doc_id == "d2" and len(rec.hits[0]) <= 2
    assert "(1) A pneumothorax shows a visceral pleural line" in tr.completion_text
    json.loads(tr.to_json())
