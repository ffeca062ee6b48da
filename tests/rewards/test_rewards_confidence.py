"""Confidence gain σc on tiny real models, checked against a manual forward pass; reference-bug regressions."""

from __future__ import annotations

import math
import re

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medrwr.protocol import split_segments
from medrwr.retrieval.base import Hit
from medrwr.rewards import get_confidence_gain_reward
from medrwr.rewards.confidence_gain import (
    MIN_LOGPROB,
    answer_token_index,
    letter_token_table,
)
from medrwr.rollout.trace import RetrievalRecord, RolloutTrace

QUESTION = "Which finding is shown?\nA. Pneumonia\nB. Pneumothorax\nC. Effusion\nD. Edema"
RETRIEVE = "<retrieve>\n(1) Pneumothorax is air in the pleural space; a rim <5 mm is small.\n</retrieve>\n"


@pytest.fixture(scope="module")
def tok(qwen_tokenizer):
    return qwen_tokenizer


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    with torch.no_grad():  # sharpen the random model so that context visibly changes the letter distribution
        model.get_output_embeddings().weight.mul_(40.0)
    return model


@pytest.fixture(scope="module")
def vlm(tiny_vlm_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medrwr.rollout.backends.processing import load_processor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm_dir).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model, load_processor(tiny_vlm_dir)


def _prompt_ids(tok, question: str = QUESTION) -> list[int]:
    msgs = [{"role": "system", "content": "You are a medical expert."}, {"role": "user", "content": question}]
    out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def make_trace(tok, text: str, prompt_ids: list[int], pieces: list[str] | None = None, **kw) -> RolloutTrace:
    """A trace whose completion is tokenised piece by piece (segments by default); retrieve pieces get mask 0."""
    parts = pieces if pieces is not None else [text[s.start : s.end] for s in split_segments(text)]
    assert "".join(parts) == text
    ids: list[int] = []
    mask: list[int] = []
    for part in parts:
        piece = tok.encode(part, add_special_tokens=False)
        ids += piece
        mask += [0 if part.startswith("<retrieve>") else 1] * len(piece)
    queries = [s.content.strip() for s in split_segments(text) if s.kind == "query" and s.closed]
    answers = [s.content.strip() for s in split_segments(text) if s.kind == "answer" and s.closed]
    retrievals = [
        RetrievalRecord(round=i, queries=[q], hits=[[Hit("d", "doc")]]) for i, q in enumerate(queries)
    ]
    return RolloutTrace(
        prompt_ids=list(prompt_ids),
        completion_ids=ids,
        completion_mask=mask,
        logprobs=[0.0] * len(ids),
        completion_text=text,
        queries=queries,
        retrievals=retrievals,
        answer=answers[-1] if answers else None,
        valid=True,
        **kw,
    )


_VOCAB_TEXTS: dict[int, list[str]] = {}


def _letter_ids_by_vocab(tok, letters: str) -> dict[str, list[int]]:
    """Independent enumeration: every vocabulary token spelling (prefix)(letter) with the documented prefixes."""
    if id(tok) not in _VOCAB_TEXTS:
        _VOCAB_TEXTS[id(tok)] = tok.batch_decode(
            [[i] for i in range(len(tok))], clean_up_tokenization_spaces=False
        )
    texts = _VOCAB_TEXTS[id(tok)]
    pat = re.compile(r"^(?:|\s|>|> |\n|\(| \(|>\()([A-Ja-j])$")
    out: dict[str, list[int]] = {L: [] for L in letters}
    for i, t in enumerate(texts):
        m = pat.match(t)
        if m and m.group(1).upper() in out and (m.group(0)[:-1] in ("", " ", ">", "> ", "\n", "(", " (", ">(")):
            out[m.group(1).upper()].append(i)
    return out


def _manual_logp(model, ids: list[int], letter_ids: dict[str, list[int]], gold: str, **extra) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **extra).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1)
    mass = {L: torch.logsumexp(logp[v], 0).item() for L, v in letter_ids.items()}
    z = math.log(sum(math.exp(m) for m in mass.values()))
    return max(mass[gold] - z, MIN_LOGPROB)


def _split_at_answer(tok, trace: RolloutTrace) -> tuple[list[int], list[int]]:
    """(with ids, without ids) up to the answer-letter token, located by hand from the answer piece."""
    model_ids = [t for t, m in zip(trace.completion_ids, trace.completion_mask) if m]
    # the hand-located letter token: the first token, scanning from the end, whose text holds a letter A-D
    # after '>' or whitespace inside the final answer block
    k = len(model_ids) - 1
    while k >= 0 and not re.search(r"(^|[>\s])[A-Da-d]$", tok.decode([model_ids[k]])):
        k -= 1
    full_index = [i for i, m in enumerate(trace.completion_mask) if m][k]
    return trace.prompt_ids + trace.completion_ids[:full_index], trace.prompt_ids + model_ids[:k]


def test_letter_table_covers_case_and_prefixes(tok):
    table = letter_token_table(tok, "AB")
    for spelling in ("B", "b", " B", " b", ">B", ">b"):
        enc = tok.encode(spelling, add_special_tokens=False)
        assert len(enc) == 1 and enc[0] in table["B"], spelling
    assert not set(table["A"]) & set(table["B"])
    assert set(table["B"]) == set(_letter_ids_by_vocab(tok, "B")["B"])


def test_confidence_gain_matches_manual_forward_text_model(tok, lm):
    prompt = _prompt_ids(tok)
    # Three documents, so the retrieved text moves the tiny random model's letter distribution measurably.
    retrieve = RETRIEVE.replace("\n</retrieve>", "\n(2) A large rim needs a chest drain.\n(3) Tension needs decompression.\n</retrieve>")
    texts = [
        "<think>The rim suggests air.</think><query>pneumothorax rim size</query>"
        + retrieve
        + "<think>Small pneumothorax.</think><answer>B</answer>",
        "<think>Look it up.</think><query>effusion</query>"
        + retrieve
        + "<think>Fluid? no.</think><query>edema signs</query>"
        + retrieve
        + "<think>ok</think><answer> C. Effusion</answer>",
        "<think>Direct answer without search.</think><answer>B</answer>",  # no query -> 0
    ]
    traces = [make_trace(tok, t, prompt) for t in texts]
    reward = get_confidence_gain_reward(lm, tok, batch_size=4)
    got = reward(
        completions=texts,
        traces=traces,
        answer=["B", "B", "B"],
        options=[["Pneumonia", "Pneumothorax", "Effusion", "Edema"]] * 3,
    )
    letter_ids = _letter_ids_by_vocab(tok, "ABCD")
    for i in range(2):
        with_ids, without_ids = _split_at_answer(tok, traces[i])
        expected = _manual_logp(lm, with_ids, letter_ids, "B") - _manual_logp(
            lm, without_ids, letter_ids, "B"
        )
        assert got[i] == pytest.approx(expected, abs=2e-4)
        assert abs(expected) > 1e-3  # the retrieved text really changed the distribution
    assert got[2] == 0.0


def test_batching_and_padding_do_not_change_values(tok, lm):
    prompt = _prompt_ids(tok)
    text = "<think>a</think><query>pneumothorax</query>" + RETRIEVE + "<think>b</think><answer>B</answer>"
    long = (
        "<think>"
        + "word " * 40
        + "</think><query>edema</query>"
        + RETRIEVE
        + "<think>c</think><answer>A</answer>"
    )
    t1, t2 = make_trace(tok, text, prompt), make_trace(tok, long, prompt)
    one = get_confidence_gain_reward(lm, tok, batch_size=1)(traces=[t1, t2], answer=["B", "B"])
    many = get_confidence_gain_reward(lm, tok, batch_size=8)(traces=[t2, t1], answer=["B", "B"])
    assert one == pytest.approx(many[::-1], abs=1e-5)


def test_with_side_uses_trace_option_probs(tok, lm):
    prompt = _prompt_ids(tok)
    text = "<think>a</think><query>pneumothorax</query>" + RETRIEVE + "<think>b</think><answer>B</answer>"
    trace = make_trace(tok, text, prompt, option_probs={"A": 0.1, "B": 0.6, "C": 0.2, "D": 0.1})
    letter_ids = _letter_ids_by_vocab(tok, "ABCD")
    _, without_ids = _split_at_answer(tok, trace)
    got = get_confidence_gain_reward(lm, tok)(traces=[trace], answer=["B"])
    assert got[0] == pytest.approx(math.log(0.6) - _manual_logp(lm, without_ids, letter_ids, "B"), abs=2e-4)


def test_vlm_forward_includes_images(tok, vlm):
    from PIL import Image

    model, proc = vlm
    image = Image.new("RGB", (56, 56), (120, 30, 200))
    for x in range(0, 56, 7):
        for y in range(0, 56, 5):
            image.putpixel((x, y), (x * 4, y * 4, 10))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    chat = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = proc(text=[chat], images=[image], return_tensors="pt")
    prompt = enc["input_ids"][0].tolist()
    text = "<think>a</think><query>pneumothorax</query>" + RETRIEVE + "<think>b</think><answer>B</answer>"
    trace = make_trace(tok, text, prompt)
    got = get_confidence_gain_reward(model, proc)(traces=[trace], answer=["B"], images=[[image]])
    letter_ids = _letter_ids_by_vocab(tok, "ABCD")
    with_ids, without_ids = _split_at_answer(tok, trace)

    def manual(ids):
        t = torch.tensor([ids])
        types = (t == proc.image_token_id).long()
        return _manual_logp(
            model,
            ids,
            letter_ids,
            "B",
            pixel_values=enc["pixel_values"],
            image_grid_thw=enc["image_grid_thw"],
            mm_token_type_ids=types,
        )

    assert got[0] == pytest.approx(manual(with_ids) - manual(without_ids), abs=2e-4)
    # a different image changes the value: the image really reaches the model
    other = get_confidence_gain_reward(model, proc)(
        traces=[trace], answer=["B"], images=[[Image.new("RGB", (56, 56), (0, 0, 0))]]
    )
    assert other[0] != pytest.approx(got[0], abs=1e-7)
    with pytest.raises(ValueError, match="image placeholder"):
        get_confidence_gain_reward(model, proc)(traces=[trace], answer=["B"])


# ----------------------------------------------------------------------------------- reference-code bugs


def test_bug1_reads_first_non_whitespace_token_not_raw_next_token(tok, lm):
    """The reference read the raw token after <answer> (prob ≈ 1 when it is whitespace); we read the letter."""
    prompt = _prompt_ids(tok)
    before = "<think>a</think><query>pneumothorax</query>"
    pieces = [before, RETRIEVE, "<think>b</think><answer>", "\n\n", " B", "</answer>"]
    text = "".join(pieces)
    trace = make_trace(tok, text, prompt, pieces=pieces)
    model_ids = [t for t, m in zip(trace.completion_ids, trace.completion_mask) if m]
    idx = answer_token_index(tok, model_ids)
    raw_next = len(tok.encode(pieces[0], add_special_tokens=False)) + len(
        tok.encode(pieces[2], add_special_tokens=False)
    )
    assert tok.decode([model_ids[raw_next]]).strip() == ""  # the reference's token: whitespace
    assert tok.decode([model_ids[idx]]) == " B"  # ours: the letter
    got = get_confidence_gain_reward(lm, tok)(traces=[trace], answer=["B"])
    letter_ids = _letter_ids_by_vocab(tok, "ABCD")
    full_idx = [i for i, m in enumerate(trace.completion_mask) if m][idx]
    expected = _manual_logp(lm, prompt + trace.completion_ids[:full_idx], letter_ids, "B") - _manual_logp(
        lm, prompt + model_ids[:idx], letter_ids, "B"
    )
    assert got[0] == pytest.approx(expected, abs=2e-4)


def test_bug2_without_side_is_an_extra_pass_not_the_first_pass(tok, lm):
    """Compat reads the first-pass distribution (none when the model searched: log p = 0); default re-runs."""
    prompt = _prompt_ids(tok)
    text = "<think>a</think><query>pneumothorax</query>" + RETRIEVE + "<think>b</think><answer>B</answer>"
    trace = make_trace(tok, text, prompt)
    letter_ids = _letter_ids_by_vocab(tok, "ABCD")
    with_ids, without_ids = _split_at_answer(tok, trace)
    lw, lwo = _manual_logp(lm, with_ids, letter_ids, "B"), _manual_logp(lm, without_ids, letter_ids, "B")
    paper = get_confidence_gain_reward(lm, tok)(traces=[trace], answer=["B"])[0]
    compat = get_confidence_gain_reward(lm, tok, compat=True)(traces=[trace], answer=["B"])[0]
    assert paper == pytest.approx(lw - lwo, abs=2e-4)
    assert compat == pytest.approx(lw, abs=2e-4)  # the reference's default 0 for the missing first pass
    assert abs(paper - compat) > 1e-3
    trace.first_pass_option_probs = {"A": 0.25, "B": 0.5, "C": 0.125, "D": 0.125}
    compat2 = get_confidence_gain_reward(lm, tok, compat=True)(traces=[trace], answer=["B"])[0]
    assert compat2 == pytest.approx(lw - math.log(0.5), abs=2e-4)


def test_bug3_gold_letter_case_and_spellings_are_summed(tok, lm):
    """The reference compared the lower-cased gold letter with case-sensitive tokens and never matched."""
    prompt = _prompt_ids(tok)
    text = "<think>a</think><query>pneumothorax</query>" + RETRIEVE + "<think>b</think><answer>b</answer>"
    trace = make_trace(tok, text, prompt)
    r = get_confidence_gain_reward(lm, tok)
    upper = r(traces=[trace], answer=["B"])[0]
    lower = r(traces=[trace], answer=["b"])[0]
    lettered = r(traces=[trace], answer=["B. Pneumothorax"])[0]
    assert upper == lower == lettered
    assert upper != 0.0
    # renormalised over the options: the letter log-probs of one position sum to probability 1
    from medrwr.rewards.confidence_gain import option_logprobs

    row = torch.log_softmax(torch.randn(len(tok)), -1)
    lps = option_logprobs(row, letter_token_table(tok, "ABCD"), "ABCD")
    assert sum(math.exp(v) for v in lps.values()) == pytest.approx(1.0, abs=1e-6)


def test_zero_cases_and_string_completions(tok, lm):
    prompt = _prompt_ids(tok)
    r = get_confidence_gain_reward(lm, tok)
    no_answer = "<think>a</think><query>pneumothorax</query>" + RETRIEVE + "<think>b"
    free_text = "<think>a</think><query>q</query>" + RETRIEVE + "<think>b</think><answer>yes</answer>"
    traces = [make_trace(tok, no_answer, prompt), make_trace(tok, free_text, prompt)]
    assert r(traces=traces, answer=["B", "yes"]) == [0.0, 0.0]
    # plain strings: tokenised segment by segment from the chat prompt (an approximation, text models only)
    msgs = [{"role": "system", "content": "You are a medical expert."}, {"role": "user", "content": QUESTION}]
    text = "<think>a</think><query>pneumothorax</query>" + RETRIEVE + "<think>b</think><answer>B</answer>"
    via_strings = r(prompts=[msgs], completions=[[{"role": "assistant", "content": text}]], answer=["B"])
    via_trace = r(traces=[make_trace(tok, text, prompt)], answer=["B"])
    assert via_strings == pytest.approx(via_trace, abs=1e-5)


# ------------------------------------------------------------------------------------------- properties

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_FRAGS = [
    "<think>",
    "</think>",
    "<query>",
    "</query>",
    "<answer>",
    "</answer>",
    RETRIEVE,
    "B",
    "b",
    " C",
    "(A)",
    "\n",
    " ",
    "x",
    "<",
    ">",
    "yes",
]


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    pieces=st.lists(st.sampled_from(_FRAGS), max_size=14),
    flips=st.lists(st.integers(0, 60), max_size=3),
    gold=st.one_of(st.none(), st.sampled_from(["A", "B", "c", "B. x", "yes", "Z"])),
    probs=st.one_of(
        st.none(), st.dictionaries(st.sampled_from("ABCD"), st.floats(allow_nan=True, allow_infinity=True))
    ),
    compat=st.booleans(),
)
def test_confidence_gain_never_raises_and_stays_in_range(tok, lm, pieces, flips, gold, probs, compat):
    from medrwr.rewards.confidence_gain import RANGE

    text = "".join(pieces)
    trace = (
        make_trace(tok, text, _prompt_ids(tok), pieces=pieces or None)
        if pieces
        else RolloutTrace(prompt_ids=[1])
    )
    for f in flips:  # an inconsistent mask must not break it either
        if f < len(trace.completion_mask):
            trace.completion_mask[f] = 1 - trace.completion_mask[f]
    trace.option_probs = probs
    if not trace.queries:
        trace.queries = ["q"]
    out = get_confidence_gain_reward(lm, tok, compat=compat)(traces=[trace], answer=[gold])
    assert len(out) == 1 and isinstance(out[0], float) and math.isfinite(out[0])
    assert RANGE[0] - 1e-9 <= out[0] <= RANGE[1] + 1e-9


@pytest.mark.parametrize("answer", ["(B) Edema", "**B**", " 'B'"])
def test_reward_reads_the_letter_where_the_engine_reads_confidence(tok, answer):
    """σc and the engine's confidence use one rule (protocol.ANSWER_CHOICE_START): the token naming the letter,
    not the "(" or "**" before it, so the with/without sides compare the same position."""
    from medrwr.protocol import ANSWER_CHOICE_START, token_index_at_char

    ids = tok.encode(f"<think>t</think><answer>{answer}</answer>", add_special_tokens=False)
    idx = answer_token_index(tok, ids)
    text = tok.decode(ids)
    start = text.index("<answer>") + len("<answer>")
    expected = token_index_at_char(tok.decode, ids, ANSWER_CHOICE_START.search(text, start).start())
    assert idx == expected
    assert "B" in tok.decode([ids[idx]])


# ---------------------------------------------------------------------- engine -> trace -> reward


def _engine_trace(tok, script, letter_probs):
    from medrwr.retrieval.base import FakeRetriever
    from medrwr.rollout.backends.base import ScriptedBackend
    from medrwr.rollout.engine import RolloutEngine, RolloutRequest

    backend = ScriptedBackend(tok, {"0": script}, letter_probs={"0": letter_probs})
    engine = RolloutEngine(backend, FakeRetriever({"d1": "Pneumothorax is air in the pleural space."}))
    (trace,) = engine.run([RolloutRequest("Which finding?", ["Pneumonia", "Pneumothorax", "Effusion", "Edema"])])
    assert trace.stop_reason == "answer", trace.error
    return trace


def test_engine_records_the_answer_position_it_read_confidence_at(tok):
    probs = {"A": 0.1, "B": 0.6, "C": 0.2, "D": 0.1}
    trace = _engine_trace(tok, ["<think>a</think>\n<query>pneumothorax</query>", "<think>b</think>\n<answer> (B)</answer>"], probs)
    pos = trace.answer_position
    assert pos is not None and trace.completion_mask[pos] == 1
    assert math.exp(trace.logprobs[pos]) == pytest.approx(trace.confidence)  # the token confidence was read at
    assert "B" in tok.decode([trace.completion_ids[pos]])
    # the reward's text-based fallback finds the same token among the model tokens
    model_index = [i for i, m in enumerate(trace.completion_mask) if m]
    assert model_index[answer_token_index(tok, trace.model_token_ids())] == pos
    assert RolloutTrace.from_json(trace.to_json()).answer_position == pos


def test_reward_reads_the_answer_position_from_the_trace(tok, lm):
    trace = _engine_trace(
        tok, ["<think>a</think>\n<query>pneumothorax</query>", "<think>b</think>\n<answer>B</answer>"],
        {"A": 0.25, "B": 0.25, "C": 0.25, "D": 0.25},
    )
    r = get_confidence_gain_reward(lm, tok, use_trace_option_probs=False)
    recorded = r(traces=[trace], answer=["B"])[0]
    letter_ids = _letter_ids_by_vocab(tok, "ABCD")
    moved = trace.answer_position - 1  # point the trace at the token before: the reward must follow it
    model_before = sum(trace.completion_mask[:moved])
    expected = _manual_logp(lm, trace.prompt_ids + trace.completion_ids[:moved], letter_ids, "B") - _manual_logp(
        lm, trace.prompt_ids + trace.model_token_ids()[:model_before], letter_ids, "B"
    )
    trace.answer_position = moved
    assert r(traces=[trace], answer=["B"])[0] == pytest.approx(expected, abs=2e-4)
    assert r(traces=[trace], answer=["B"])[0] != pytest.approx(recorded, abs=1e-6)


def test_compat_uses_the_engine_written_first_pass_distribution(tok, lm):
    """End to end: the engine writes ``first_pass_option_probs`` and compat σc reads it (docs/method.md §2)."""
    probs = {"A": 0.1, "B": 0.6, "C": 0.2, "D": 0.1}
    compat = get_confidence_gain_reward(lm, tok, compat=True)
    # The first pass answered directly: its distribution is recorded and is the final one.
    direct = _engine_trace(tok, ["<think>a</think>\n<answer>B</answer>"], probs)
    assert direct.first_pass_option_probs == pytest.approx(direct.option_probs)
    assert direct.first_pass_option_probs["B"] == pytest.approx(0.6)
    assert compat(traces=[direct], answer=["B"]) == [0.0]  # no query: σc = 0
    # The first pass stopped at a query: no first-pass answer, as in the reference (its log p = 0 stands in).
    searched = _engine_trace(tok, ["<think>a</think>\n<query>pneumothorax</query>", "<think>b</think>\n<answer>B</answer>"], probs)
    assert searched.first_pass_option_probs is None
    assert compat(traces=[searched], answer=["B"])[0] == pytest.approx(math.log(0.6), abs=1e-6)
    # A recorded first pass is what compat subtracts.
    searched.first_pass_option_probs = {"A": 0.25, "B": 0.3, "C": 0.25, "D": 0.2}
    assert compat(traces=[searched], answer=["B"])[0] == pytest.approx(math.log(0.6) - math.log(0.3), abs=1e-6)
    again = RolloutTrace.from_dict(searched.to_dict())
    assert compat(traces=[again], answer=["B"])[0] == pytest.approx(math.log(0.6) - math.log(0.3), abs=1e-6)
