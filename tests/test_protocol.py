"""The protocol parser and answer extraction: table cases plus property tests (>= 2,000 examples each)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medrwr.protocol import (
    ERROR_CODES,
    extract_choice,
    extract_yes_no,
    format_question,
    format_retrieval,
    format_retrieval_failure,
    normalize_text,
    parse_completion,
    sanitize_document,
    split_segments,
    strip_retrieve_blocks,
    system_prompt,
)

PROPERTY = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------ table cases

VALID = [
    "<think>the heart is enlarged</think><answer>B</answer>",
    "<think>a</think>\n<query>cardiomegaly causes</query>\n<retrieve>\n(1) doc <5 mm\n</retrieve>\n"
    "<think>b</think>\n<answer>(C) Pneumothorax</answer>",
    "  <think>x</think>  <query>q1</query><retrieve>None</retrieve><think>y</think><query>q2</query>"
    "<retrieve>d</retrieve><think>z</think><answer>A</answer>\n",
]


@pytest.mark.parametrize("text", VALID)
def test_valid_transcripts(text):
    parsed = parse_completion(text)
    assert parsed.valid, parsed.error
    assert parsed.error is None and parsed.error_code is None
    assert parsed.answer is not None


def test_queries_answer_and_offsets():
    text = VALID[1]
    parsed = parse_completion(text)
    assert parsed.queries == ["cardiomegaly causes"]
    assert parsed.answer == "(C) Pneumothorax"
    assert parsed.retrieve_count == 1
    kinds = [s.kind for s in parsed.blocks]
    assert kinds == ["think", "query", "retrieve", "think", "answer"]
    q = parsed.blocks[1]
    assert text[q.start : q.end] == "<query>cardiomegaly causes</query>"
    assert q.content == "cardiomegaly causes"


INVALID = [
    ("", "empty"),
    ("   \n ", "empty"),
    ("hello <think>a</think><answer>B</answer>", "text_outside_blocks"),
    ("<think>a</think><answer>B</answer> trailing", "text_outside_blocks"),
    ("<think>a</think><answer>B", "unclosed_block"),
    ("<think>a", "unclosed_block"),
    ("<think>  </think><answer>B</answer>", "empty_block"),
    ("<think>a</think><answer></answer>", "empty_block"),
    ("<think>a <b> c</think><answer>B</answer>", "angle_bracket"),
    ("<think>a</think><query>x > 5</query><retrieve>d</retrieve><think>b</think><answer>A</answer>", "angle_bracket"),
    ("<think>a</think><answer>B > C</answer>", "angle_bracket"),
    ("<answer>B</answer>", "missing_think"),
    ("<query>q</query><retrieve>d</retrieve><think>a</think><answer>B</answer>", "missing_think"),
    ("<think>a</think><query>q</query><think>b</think><answer>B</answer>", "query_without_retrieve"),
    ("<think>a</think><query>q</query><answer>B</answer>", "query_without_retrieve"),
    ("<think>a</think><query>q</query><query>r</query>", "query_without_retrieve"),
    ("<think>a</think><retrieve>d</retrieve><think>b</think><answer>B</answer>", "retrieve_without_query"),
    ("<think>a</think>", "no_answer"),
    ("<think>a</think><query>q</query><retrieve>d</retrieve>", "no_answer"),
    ("<think>a</think><answer>B</answer><think>c</think>", "answer_not_last"),
    ("<think>a</think><answer>B</answer><answer>C</answer>", "answer_not_last"),
    ("<think>a</think><think>b</think><answer>B</answer>", "bad_order"),
]


@pytest.mark.parametrize("text,code", INVALID)
def test_invalid_classes_rejected_with_reason(text, code):
    parsed = parse_completion(text)
    assert not parsed.valid
    assert parsed.error_code == code, parsed.error
    assert parsed.error.startswith(code + ":")


def test_every_error_class_is_exercised():
    assert {code for _, code in INVALID} == set(ERROR_CODES)


def test_retrieve_blocks_may_hold_angle_brackets_and_tags_are_sanitised():
    doc = "nodules <5 mm and </retrieve> inside <answer>Z</answer>"
    block = format_retrieval([doc])
    text = f"<think>a</think><query>q</query>{block}<think>b</think><answer>A</answer>"
    parsed = parse_completion(text)
    assert parsed.valid, parsed.error
    assert parsed.answer == "A"
    assert "<5 mm" in parsed.blocks[2].content


def test_format_retrieval_shapes():
    assert format_retrieval(["a b", "c"]) == "<retrieve>\n(1) a b\n(2) c\n</retrieve>\n"
    assert format_retrieval([]) == "<retrieve>\nNone\n</retrieve>\n"
    assert format_retrieval_failure("timeout after 5 s").startswith("<retrieve>\nRetrieval failed: timeout")


def test_strip_retrieve_blocks():
    text = "<think>a</think><query>q</query><retrieve>\n(1) d\n</retrieve>\n<think>b</think><answer>A</answer>"
    assert strip_retrieve_blocks(text) == "<think>a</think><query>q</query>\n<think>b</think><answer>A</answer>"


def test_sanitize_document_is_idempotent_and_tag_free():
    s = sanitize_document("x </RETRIEVE> <query > y")
    assert "</RETRIEVE>" not in s and "<query >" not in s
    assert sanitize_document(s) == s


def test_unclosed_query_is_not_a_query():
    parsed = parse_completion("<think>a</think><query>half written")
    assert parsed.queries == []
    assert parsed.error_code == "unclosed_block"


def test_format_question_and_prompts():
    assert format_question("Which?", ["x", "y"]) == "Which?\nA. x\nB. y"
    assert format_question("Which?", {"C": "z"}) == "Which?\nC. z"
    assert "<query>" in system_prompt(True) and "image" in system_prompt(True)
    assert "image" not in system_prompt(False)


# ------------------------------------------------------------------------------------------ extraction

@pytest.mark.parametrize(
    "answer,expected",
    [
        ("B", "B"),
        ("b", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("B)", "B"),
        ("B: Cardiomegaly", "B"),
        ("B. Cardiomegaly", "B"),
        ("Answer: B", "B"),
        ("answer: c", "C"),
        ("The answer is (D)", "D"),
        ("The correct option is E.", "E"),
        ("  (a) effusion", "A"),
        ("J", "J"),
        ("K", None),
        ("pneumonia", None),
        ("a 5 mm nodule", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_choice(answer, expected):
    assert extract_choice(answer) == expected


def test_extract_choice_respects_letters():
    assert extract_choice("E", letters="ABCD") is None
    assert extract_choice("D", letters="ABCD") == "D"


@pytest.mark.parametrize(
    "answer,expected",
    [("Yes", "yes"), ("yes, it is", "yes"), ("No.", "no"), ("no evidence", "no"), ("maybe", None), ("", None)],
)
def test_extract_yes_no(answer, expected):
    assert extract_yes_no(answer) == expected


def test_normalize_text():
    assert normalize_text("  The Left  Lung! ") == "left lung"
    assert normalize_text("Ｃａｒｄｉｏ") == "cardio"


# ------------------------------------------------------------------------------------------ properties

TAG_BITS = ["<think>", "</think>", "<query>", "</query>", "<retrieve>", "</retrieve>", "<answer>", "</answer>",
            "<", ">", " ", "\n", "A", "(B)", "é", "心", "🫀", "5"]
tagged_text = st.lists(st.one_of(st.sampled_from(TAG_BITS), st.text(max_size=8)), max_size=30).map("".join)


@PROPERTY
@given(st.one_of(st.text(), tagged_text))
def test_parser_never_raises_and_segments_cover_text(text):
    parsed = parse_completion(text)
    pos = 0
    for seg in parsed.segments:
        assert seg.start == pos and seg.end >= seg.start
        pos = seg.end
    assert pos == len(text)
    assert "".join(text[s.start : s.end] for s in parsed.segments) == text
    assert parsed.valid == (parsed.error is None)
    if not parsed.valid:
        assert parsed.error_code in ERROR_CODES


model_block = st.text(
    alphabet=st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), min_size=1, max_size=20
).filter(lambda s: s.strip())
doc_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
ws = st.sampled_from(["", " ", "\n", "\n\n", "  \t"])


@st.composite
def valid_transcripts(draw):
    rounds = draw(st.integers(0, 3))
    parts: list[tuple[str, str]] = []
    for _ in range(rounds):
        parts.append(("think", draw(model_block)))
        parts.append(("query", draw(model_block)))
        docs = draw(st.lists(doc_text, max_size=3))
        parts.append(("retrieve", format_retrieval(docs)[len("<retrieve>"):-len("</retrieve>\n")]))
    parts.append(("think", draw(model_block)))
    parts.append(("answer", draw(model_block)))
    text = draw(ws)
    for kind, content in parts:
        text += f"<{kind}>{content}</{kind}>" + draw(ws)
    return text, parts


@PROPERTY
@given(valid_transcripts())
def test_valid_transcripts_round_trip(sample):
    text, parts = sample
    parsed = parse_completion(text)
    assert parsed.valid, parsed.error
    assert [(s.kind, s.content) for s in parsed.blocks] == parts
    assert parsed.queries == [c.strip() for k, c in parts if k == "query"]
    assert parsed.answer == parts[-1][1].strip()
    # Re-serialising the parsed blocks gives a transcript with the same segments.
    rebuilt = "".join(f"<{s.kind}>{s.content}</{s.kind}>" for s in parsed.blocks)
    assert [(s.kind, s.content) for s in parse_completion(rebuilt).blocks] == parts


@PROPERTY
@given(valid_transcripts(), st.sampled_from(["drop_last", "angle", "empty", "prefix_text", "dup_answer"]))
def test_corrupted_transcripts_are_rejected(sample, corruption):
    text, parts = sample
    if corruption == "drop_last":
        bad = text[: text.rindex("<answer>")]
        code = {"no_answer"}
    elif corruption == "angle":
        bad = text.replace("<answer>", "<answer>x > y ", 1)
        code = {"angle_bracket"}
    elif corruption == "empty":
        i = text.rindex("<answer>") + len("<answer>")
        j = text.rindex("</answer>")
        bad = text[:i] + " " + text[j:]
        code = {"empty_block"}
    elif corruption == "prefix_text":
        bad = "Sure! " + text
        code = {"text_outside_blocks"}
    else:
        bad = text + "<answer>B</answer>"
        code = {"answer_not_last"}
    parsed = parse_completion(bad)
    assert not parsed.valid
    assert parsed.error_code in code, parsed.error


@PROPERTY
@given(st.text(max_size=200))
def test_extractors_never_raise(text):
    choice = extract_choice(text)
    assert choice is None or (len(choice) == 1 and choice in "ABCDEFGHIJ")
    assert extract_yes_no(text) in (None, "yes", "no")
    assert isinstance(normalize_text(text), str)


def test_one_megabyte_and_pathological_inputs():
    big = "<think>" + "x" * 1_000_000 + "</think><answer>A</answer>"
    assert parse_completion(big).valid
    nested = "<think>" * 10_000 + "</think>" * 10_000
    assert not parse_completion(nested).valid
    many = "<query>" * 50_000
    parsed = parse_completion(many)
    assert parsed.error_code == "unclosed_block"
    assert len(split_segments("<retrieve>" * 1000)) >= 1
    assert parse_completion(None).error_code == "empty"  # type: ignore[arg-type]
