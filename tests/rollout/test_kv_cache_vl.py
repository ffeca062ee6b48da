"""KV-cache reuse on Qwen2.5-VL (medrwr.rollout.backends.kv_cache_vl): cached turns must give the same ids and
log-probabilities as the uncached path (the reference) with images in the prompt, M-RoPE positions, rows
finishing at different turns and a CDIR turn that inserts a second image.

Everything is real: the tiny random Qwen2.5-VL with its processor, synthetic PIL images, transformers generate,
the engine, a retriever and an image retriever over a real PNG. ForcedTranscript scripts the tags, FREE holes
are sampled by the model.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from medrwr.config import CDIRConfig, RolloutConfig
from medrwr.retrieval.base import FakeImageRetriever, FakeRetriever, ImageHit
from medrwr.rollout.backends.hf import HFBackend
from medrwr.rollout.backends.kv_cache_vl import VLReuse
from medrwr.rollout.engine import RolloutEngine, RolloutRequest
from medrwr.testing import FREE, ForcedTranscript

DOCS = {
    "d1": "Lobar pneumonia shows consolidation with air bronchograms.",
    "d2": "A pneumothorax shows a visceral pleural line.",
}
TOL = 5e-6
"""Log-prob tolerance (fp32 rounding; observed <= 1e-6). The tiny random model is insensitive, so a loose
tolerance would let a wrong cache pass: ``test_wrong_positions_would_be_caught`` shows that M-RoPE positions off
by the image offset move the log-probs by far more than this."""
QUESTIONS = ["Short?", "A much longer question text here, with more words?", "Mid one?", "x?"]


@pytest.fixture(scope="module")
def vlm(tiny_vlm_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medrwr.rollout.backends.processing import load_processor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm_dir).eval()
    return model, load_processor(tiny_vlm_dir)


def _image(w, h, seed):
    from PIL import Image

    arr = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")
    return Image.fromarray(arr)


def _letters(tok):
    return [tok.convert_tokens_to_ids(c) for c in "ABC"]


def _scripts(tok):
    """Rows that end after 1, 2, 4 and 1 turns; FREE holes are sampled by the model itself."""
    letters = _letters(tok)
    return [
        [["<think>", FREE(5), "</think>\n<query>pneumonia consolidation</query>\n"]],
        [["<think>", FREE(3), "</think><query>pleural line</query>"],
         ["<think>", FREE(4), "</think>\n<answer>", FREE(1, letters), "</answer>"]],
        [["<think>", FREE(2), "</think><query>air</query>"],
         ["<think>", FREE(6), "</think><query>pneumothorax</query>"],
         ["<think>", FREE(3), "</think><query>lobar</query>"],
         ["<answer>", FREE(1, letters), "</answer>"]],
        [["<answer>", FREE(1, letters), "</answer>"]],
    ]


def _requests():
    images = [_image(64, 64, 1), _image(64, 64, 1), _image(128, 96, 2), _image(56, 84, 3)]  # rows 0, 1: same image
    return [RolloutRequest(q, ["a", "b", "c"], images=[im]) for q, im in zip(QUESTIONS, images)]


def _patches(proc, *images):
    return sum(proc.image_processor(images=[im], return_tensors="pt")["pixel_values"].shape[0] for im in images)


def _rollouts(model, proc, kv_cache, temperature=1.0):
    tok = proc.tokenizer
    backend = HFBackend(model, proc, logits_processors=[ForcedTranscript(tok, rows=_scripts(tok))], seed=7,
                        temperature=temperature, top_logprobs=3, kv_cache=kv_cache)
    engine = RolloutEngine(backend, FakeRetriever(DOCS), RolloutConfig(max_rounds=3, temperature=temperature))
    return engine.run(_requests()), backend


def _max_diff(ref, got):
    return max(float(np.max(np.abs(np.asarray(b.logprobs) - np.asarray(a.logprobs)))) for a, b in zip(ref, got))


def _assert_same(ref, got):
    for a, b in zip(ref, got):
        b.check()
        assert b.completion_ids == a.completion_ids
        assert b.completion_mask == a.completion_mask
        assert b.stop_reason == a.stop_reason and b.answer == a.answer
    assert _max_diff(ref, got) <= TOL


class VisionSpy:
    """Counts the image patches the vision tower encodes (one entry per forward with images)."""

    def __init__(self, model):
        self.patches: list[int] = []
        self.handle = model.model.visual.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.patches.append(int((args[0] if args else kwargs["hidden_states"]).shape[0]))

    def close(self):
        self.handle.remove()


def test_cached_image_rollouts_equal_uncached(vlm):
    model, proc = vlm
    ref, plain = _rollouts(model, proc, "off")
    spy = VisionSpy(model)
    try:
        got, cached = _rollouts(model, proc, "on")
    finally:
        spy.close()
    assert plain.kv_cache is None and cached.kv_cache.vl is not None
    assert sorted(t.rounds for t in got) == [0, 1, 1, 3]  # rows leave the batch after turns 1, 2, 2 and 4
    assert cached.kv_cache.shared_prefills == 1  # the system prompt, up to the first image (rows differ there)
    assert cached.kv_cache.reused_tokens > 300
    _assert_same(ref, got)
    # Every image is encoded once, in the first call; later turns read the kept keys/values.
    assert spy.patches == [_patches(proc, *(r.images[0] for r in _requests()))]


def test_wrong_positions_would_be_caught(vlm, monkeypatch):
    """The test has teeth: continuing with text positions (cumsum, ignoring Qwen2.5-VL's image offset) for the
    fed columns, the mistake a text-model cache would make, moves the log-probs far beyond TOL."""
    model, proc = vlm
    finish = VLReuse.finish

    def text_positions_after_cache(self, batch, rows, mms, hits, pad):
        shown = finish(self, batch, rows, mms, hits, pad)
        if any(hits):
            pos = batch["position_ids"]
            pos[1:] = pos[0][None]
        return shown

    ref, _ = _rollouts(model, proc, "off", temperature=0)
    monkeypatch.setattr(VLReuse, "finish", text_positions_after_cache)
    wrong, _ = _rollouts(model, proc, "on", temperature=0)
    assert _max_diff(ref, wrong) > 100 * TOL


# ------------------------------------------------------------------------------------------ CDIR


def test_cached_cdir_rollout_equals_uncached(vlm, tmp_path):
    """A CDIR turn drops the last answer and inserts a case image: the cached path reuses everything before
    the drop and encodes only the case image."""
    model, proc = vlm
    tok = proc.tokenizer
    letters = _letters(tok)
    case_path = tmp_path / "case.png"
    _image(80, 80, 7).save(case_path)
    answer = ["<think>", FREE(2), "</think>\n<answer>", FREE(1, letters), "</answer>"]

    def script(prompt):  # CDIR rewrites the transcript (drops the answer), so the re-answer is a fresh script
        if "Which sign?" in prompt and "consultation" not in prompt:
            return [["<think>", FREE(3), "</think><query>pleural line</query>"], answer]
        return [answer]

    requests = [RolloutRequest("Which sign?", ["a", "b", "c"], images=[_image(64, 64, 8)]),
                RolloutRequest("A longer question about the film?", ["a", "b", "c"], images=[_image(96, 64, 9)])]
    runs = {}
    for mode in ("off", "on"):
        backend = HFBackend(model, proc, logits_processors=[ForcedTranscript(tok, choose=script)], seed=3,
                            top_logprobs=2, kv_cache=mode)
        image_retriever = FakeImageRetriever([ImageHit("case-7", str(case_path), "Right lower lobe consolidation.")])
        engine = RolloutEngine(backend, FakeRetriever(DOCS), RolloutConfig(max_rounds=2),
                               image_retriever=image_retriever, cdir=CDIRConfig(enabled=True, threshold=1.0))
        spy = VisionSpy(model)
        try:
            runs[mode] = engine.run(requests), backend, spy.patches
        finally:
            spy.close()
    (ref, _, ref_patches), (got, cached, patches) = runs["off"], runs["on"]
    assert all(t.cdir.triggered for t in got) and all(len(t.images) == 2 for t in got)
    _assert_same(ref, got)
    case = _patches(proc, _image(80, 80, 7))
    assert patches[-1] == 2 * case < ref_patches[-1]  # the CDIR call encodes only the two inserted case images
    assert cached.kv_cache.reused_tokens > 200


def test_a_group_sharing_an_image_prefills_it_once(vlm):
    """GRPO-style rows with the same image (and different questions): the shared prefix, image included, is
    prefilled once as one row and the batch encodes no image at all. Then a fresh text-only row with a long new
    part and a fresh row with another image join the cached rows. The cached rows' masked gap columns then hold
    their image's placeholders, which the model must not count as an image to fill: it is fed pads there, while
    logits processors still see the real ids (the forcer finds its rows' history)."""
    from medrwr.rollout.backends.base import GenerationState

    model, proc = vlm
    image, second_image = _image(64, 64, 5), _image(112, 56, 6)
    outs = {}
    for mode in ("off", "on"):
        forcer = ForcedTranscript(proc.tokenizer, [[FREE(4)], ["Zebra", FREE(2)]])  # turn 2 opens with "Zebra"
        backend = HFBackend(model, proc, temperature=0, top_logprobs=3, kv_cache=mode, logits_processors=[forcer])
        prompts = [backend.prepare_prompt([{"role": "user", "content": [{"type": "image", "image": image},
                                                                         {"type": "text", "text": q}]}], [image])
                   for q in QUESTIONS[:3]]
        long_question = "No image here, but a long question about consolidation, effusion and the pleural line? " * 3
        text_only = backend.prepare_prompt([{"role": "user", "content": long_question}])
        other = backend.prepare_prompt([{"role": "user", "content": [{"type": "image", "image": second_image},
                                                                     {"type": "text", "text": "New?"}]}],
                                       [second_image])
        spy = VisionSpy(model)
        try:
            first = backend.generate([GenerationState(p.prompt_ids, p.mm) for p in prompts], [], 4)
            again = [GenerationState(p.prompt_ids + c.token_ids + [13], p.mm) for p, c in zip(prompts, first)]
            fresh = [GenerationState(p.prompt_ids, p.mm) for p in (text_only, other)]
            second = backend.generate(again + fresh, [], 3)
        finally:
            spy.close()
        outs[mode] = first + second, backend, spy.patches
    (ref, _, ref_patches), (got, cached, patches) = outs["off"], outs["on"]
    assert cached.kv_cache.shared_prefills == 1
    zebra = proc.tokenizer.encode("Zebra")
    assert all(c.token_ids[: len(zebra)] == zebra for c in got[3:6])  # the forcer recognised its rows' history
    one, new = _patches(proc, image), _patches(proc, second_image)
    assert patches == [one, new] and ref_patches == [3 * one, 3 * one + new]  # later calls: only the new image
    for a, b in zip(ref, got):
        assert b.token_ids == a.token_ids
        assert np.allclose(b.logprobs, a.logprobs, atol=TOL, rtol=0)
        assert np.allclose(b.top_logprobs, a.top_logprobs, atol=TOL, rtol=0)


def test_rows_with_video_fall_back_and_images_are_never_split(vlm):
    model, proc = vlm
    backend = HFBackend(model, proc, temperature=0, kv_cache="on")
    video = model.config.video_token_id
    ids = backend.tokenizer.encode("<|im_start|>user\nclip<|im_end|>\n")
    batch = {"input_ids": torch.tensor([ids + [video]]),
             "attention_mask": torch.ones(1, len(ids) + 1, dtype=torch.long)}
    assert backend.kv_cache.prepare([ids + [video]], batch, [None]) is None  # videos: the uncached path
    key = (5, 6, -9, -9, -9, 7)
    assert [VLReuse.cut(key, n) for n in range(7)] == [0, 1, 2, 2, 2, 5, 6]  # a boundary moves to an image's start
