"""The rollout loop on real tiny models (transformers generate, CPU): a tiny random Qwen2.5-VL and a tiny text LM.

Random models never write tags, so a forcing logits processor (medrwr.testing.ForcedTranscript) scripts what
they write; FREE holes let the model pick the answer letter itself. Everything else is real: tokenizer,
processor, M-RoPE positions, left padding, stop strings, log-probabilities.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medrwr.config import CDIRConfig, RolloutConfig
from medrwr.retrieval.base import FakeImageRetriever, FakeRetriever, ImageHit
from medrwr.rollout.backends.hf import HFBackend
from medrwr.rollout.engine import RolloutEngine, RolloutRequest
from medrwr.testing import FREE, ForcedTranscript

DOCS = {
    "d1": "Lobar pneumonia shows consolidation with air bronchograms.",
    "d2": "A pneumothorax shows a visceral pleural line.",
}
LETTERS = "ABCD"


@pytest.fixture(scope="module")
def vlm(tiny_vlm_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medrwr.rollout.backends.processing import load_processor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm_dir).eval()
    return model, load_processor(tiny_vlm_dir)


@pytest.fixture(scope="module")
def text_lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from medrwr.rollout.backends.processing import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval(), load_tokenizer(tiny_lm_dir)


def _image(w, h, seed):
    from PIL import Image

    arr = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")
    return Image.fromarray(arr)


def _letter_ids(tok):
    return [tok.convert_tokens_to_ids(c) for c in LETTERS]


def _script(tok):
    return [
        "<think>Opacity.</think>\n<query>pneumonia consolidation</query>\n",
        "<think>Pleura?</think>\n<query>pneumothorax pleural line</query>",
        ["<think>Fits.</think>\n<answer>", FREE(1, _letter_ids(tok)), "</answer>"],
    ]


class VisionSpy:
    """Records what the vision tower receives on every forward (one per generate call with images)."""

    def __init__(self, model):
        self.calls: list[tuple[int, list[list[int]]]] = []
        self.handle = model.model.visual.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        pixels = args[0] if args else kwargs["hidden_states"]
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.calls.append((int(pixels.shape[0]), grid.tolist()))

    def close(self):
        self.handle.remove()


def _patches(proc, img):
    return int(proc.image_processor(images=[img], return_tensors="pt")["image_grid_thw"][0].prod())


def _teacher_forced_logprobs(model, trace, pixel_inputs=None):
    """Log-probabilities of the completion tokens from ONE full forward pass (the check, not the engine)."""
    ids = torch.tensor([trace.prompt_ids + trace.completion_ids])
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if pixel_inputs is not None:
        kwargs.update(pixel_inputs)
        types = torch.zeros_like(ids)
        types[ids == 151655] = 1
        kwargs["mm_token_type_ids"] = types
    with torch.no_grad():
        logits = model(**kwargs).logits[0].float()
    lsm = torch.log_softmax(logits, -1)
    p = len(trace.prompt_ids)
    return [float(lsm[p + i - 1, t]) for i, t in enumerate(trace.completion_ids)], lsm[p - 1 :]


def test_prompt_ids_equal_the_processor_chat_template(vlm):
    model, proc = vlm
    backend = HFBackend(model, proc)
    img = _image(64, 48, 0)
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What?\nA. x\nB. y"}]},
    ]
    prompt = backend.prepare_prompt(messages, [img])
    ref = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt.prompt_ids == list(ref["input_ids"][0] if isinstance(ref["input_ids"][0], list) else ref["input_ids"])
    assert prompt.mm is not None and len(prompt.mm) == 1
    assert prompt.prompt_ids.count(151655) == _patches(proc, img) // 4


@pytest.mark.slow
def test_forced_multi_round_on_tiny_vlm(vlm):
    model, proc = vlm
    tok = proc.tokenizer
    forcer = ForcedTranscript(tok, _script(tok))
    backend = HFBackend(model, proc, logits_processors=[forcer], seed=0)
    retriever = FakeRetriever(DOCS)
    engine = RolloutEngine(backend, retriever, RolloutConfig(max_new_tokens_per_turn=64))
    images = [_image(64, 64, 1), _image(96, 64, 2)]  # different sizes -> different prompt lengths (left padding)
    requests = [RolloutRequest(f"Finding {i}?", ["a", "b", "c", "d"], images=[img]) for i, img in enumerate(images)]
    spy = VisionSpy(model)
    try:
        traces = engine.run(requests)
    finally:
        spy.close()
    # One batched retriever call per step, both rows paused at a query.
    assert retriever.calls == [["pneumonia consolidation"] * 2, ["pneumothorax pleural line"] * 2]
    # The images were fed on EVERY turn (3 generate calls), both rows' patches each time.
    patches = sum(_patches(proc, img) for img in images)
    assert backend.forward_calls == 3
    assert [c[0] for c in spy.calls] == [patches] * 3
    assert all(len(c[1]) == 2 for c in spy.calls)
    for tr, img in zip(traces, images):
        tr.check()
        assert tr.stop_reason == "answer" and tr.valid and tr.rounds == 2
        model_text = tok.decode(tr.model_token_ids())
        script = _script(tok)
        assert model_text.startswith(script[0] + script[1])
        assert model_text.endswith("</answer>") and tr.choice in LETTERS
        inserted = tok.decode(tr.inserted_token_ids())
        assert inserted == "".join(s.text for s in tr.spans if not s.by_model)
        assert inserted.count("<retrieve>") == 2 and "(1) Lobar pneumonia" in inserted
        # The stop string ended inside a token (">\n"): that token is kept whole, no newline is added.
        q1 = next(s for s in tr.spans if s.kind == "query")
        assert tok.decode([tr.completion_ids[q1.end - 1]]) == ">\n"
        assert "</query>\n<retrieve>" in tr.completion_text and "</query>\n\n<retrieve>" not in tr.completion_text
        # The second query ends on a bare ">": the environment puts a "\n" (mask 0) before its block.
        assert "</query>\n<retrieve>\n(1) A pneumothorax" in tr.completion_text
    # Recorded log-probs equal a teacher-forced forward pass (no extra pass in the engine; this one checks it).
    tr = traces[1]
    pix = proc.image_processor(images=[images[1]], return_tensors="pt")
    ref, lsm = _teacher_forced_logprobs(model, tr, {"pixel_values": pix["pixel_values"],
                                                    "image_grid_thw": pix["image_grid_thw"]})
    got = [lp for lp, m in zip(tr.logprobs, tr.completion_mask) if m]
    want = [lp for lp, m in zip(ref, tr.completion_mask) if m]
    assert np.allclose(got, want, atol=2e-3), max(abs(a - b) for a, b in zip(got, want))
    # Confidence: the chosen letter's probability at the answer position, options renormalised.
    ans = next(s for s in tr.spans if s.kind == "answer")
    pos = next(i for i in range(ans.start, ans.end) if tok.decode([tr.completion_ids[i]]).strip(">") in set(LETTERS))
    assert tr.confidence == pytest.approx(math.exp(ref[pos]), rel=1e-2)
    letter_p = {L: float(lsm[pos][tok.convert_tokens_to_ids(L)].exp()) for L in LETTERS}
    assert tr.option_probs[tr.choice] >= letter_p[tr.choice] / sum(letter_p.values()) * 0.5
    assert sum(tr.option_probs.values()) == pytest.approx(1.0)


def test_batched_rows_match_rows_run_alone(vlm):
    """Left padding + M-RoPE: a row's log-probs do not depend on its batch-mates."""
    model, proc = vlm
    tok = proc.tokenizer
    script = [["<think>Look.</think>\n<answer>", FREE(1, _letter_ids(tok)), "</answer>"]]
    images = [_image(64, 64, 3), _image(128, 96, 4)]

    def run(imgs):
        backend = HFBackend(model, proc, logits_processors=[ForcedTranscript(tok, script)], temperature=0)
        eng = RolloutEngine(backend, None)
        return eng.run([RolloutRequest("Q?", ["a", "b", "c", "d"], images=[im]) for im in imgs])

    together = run(images)
    alone = run(images[:1])
    assert together[0].completion_ids == alone[0].completion_ids
    assert np.allclose(together[0].logprobs, alone[0].logprobs, atol=1e-4)
    assert together[0].confidence == pytest.approx(alone[0].confidence, rel=1e-3)


@pytest.mark.parametrize("threshold,expect_cdir", [(1.0, True), (0.0, False)])
def test_cdir_inserts_a_real_image_on_tiny_vlm(vlm, tmp_path, threshold, expect_cdir):
    model, proc = vlm
    tok = proc.tokenizer
    case_img = _image(80, 80, 7)
    case_path = tmp_path / "case.png"
    case_img.save(case_path)
    script = [["<think>Look.</think>\n<answer>", FREE(1, _letter_ids(tok)), "</answer>"]]
    backend = HFBackend(model, proc, logits_processors=[ForcedTranscript(tok, script)], seed=0)
    image_retriever = FakeImageRetriever([ImageHit("case-7", str(case_path), "Right lower lobe consolidation.")])
    engine = RolloutEngine(backend, None, image_retriever=image_retriever,
                           cdir=CDIRConfig(enabled=True, threshold=threshold))
    question_img = _image(64, 64, 8)
    spy = VisionSpy(model)
    try:
        (tr,) = engine.run([RolloutRequest("Q?", ["a", "b", "c", "d"], images=[question_img])])
    finally:
        spy.close()
    tr.check()
    assert tr.cdir.triggered is expect_cdir
    q_patches = _patches(proc, question_img)
    if not expect_cdir:
        assert [c[0] for c in spy.calls] == [q_patches] and image_retriever.calls == 0
        return
    # The second forward received BOTH images: the question's and the retrieved case's.
    c_patches = _patches(proc, case_img)
    assert [c[0] for c in spy.calls] == [q_patches, q_patches + c_patches]
    assert len(spy.calls[1][1]) == 2
    assert tr.completion_ids.count(151655) == c_patches // 4  # the case image's placeholders, mask 0
    assert tr.cdir.first.confidence < 1.0 and tr.cdir.second.confidence is not None
    assert "Report: Right lower lobe consolidation." in tr.completion_text
    assert tr.valid and tr.stop_reason == "answer" and len(tr.images) == 2


@pytest.mark.slow
def test_text_only_tiny_lm_through_the_same_engine(text_lm):
    model, tok = text_lm
    forcer = ForcedTranscript(tok, _script(tok))
    backend = HFBackend(model, tok, logits_processors=[forcer], seed=0)
    assert not backend.supports_images
    engine = RolloutEngine(backend, FakeRetriever(DOCS))
    requests = [RolloutRequest("Short?", ["a", "b"]), RolloutRequest("A much longer question text here?", ["a", "b", "c"])]
    traces = engine.run(requests)
    for req, tr in zip(requests, traces):
        tr.check()
        assert tr.stop_reason == "answer" and tr.valid and tr.rounds == 2
        messages = engine._messages_for(req, [])
        ref = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if hasattr(ref, "keys") else ref
        assert tr.prompt_ids == list(ref)
        assert "<query>pneumonia consolidation</query>" in tok.decode(tr.model_token_ids())
    ref, _ = _teacher_forced_logprobs(model, traces[0])
    got = [lp for lp, m in zip(traces[0].logprobs, traces[0].completion_mask) if m]
    want = [lp for lp, m in zip(ref, traces[0].completion_mask) if m]
    assert np.allclose(got, want, atol=2e-3)


def test_turn_budget_and_eos_on_a_real_model(text_lm):
    model, tok = text_lm
    # Turn 1 is longer than the budget: generation is cut by length, the trace says so.
    forcer = ForcedTranscript(tok, ["<think>" + "very " * 12 + "long</think>"])
    eng = RolloutEngine(HFBackend(model, tok, logits_processors=[forcer]), None,
                        RolloutConfig(max_new_tokens_per_turn=9, max_total_new_tokens=9))
    (tr,) = eng.run([RolloutRequest("Q?", ["a", "b"])])
    assert tr.stop_reason == "max_tokens" and tr.num_model_tokens == 9
    # A turn that ends without a tag: the forcer emits <|im_end|>, kept as the last model token.
    forcer = ForcedTranscript(tok, ["<think>unsure</think>"])
    eng = RolloutEngine(HFBackend(model, tok, logits_processors=[forcer]), None)
    (tr,) = eng.run([RolloutRequest("Q?", ["a", "b"])])
    assert tr.stop_reason == "eos" and tr.completion_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tr.completion_text == "<think>unsure</think>"
