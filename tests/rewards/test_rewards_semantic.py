"""Query-semantic rewards: entity extraction (lexicon, interface), σq_text tables, σq_img on a tiny CLIP."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from medrwr.retrieval.base import Hit
from medrwr.rewards import entities as E
from medrwr.rewards import entities_lexicon as L
from medrwr.rewards.entities import LexiconEntityExtractor
from medrwr.rewards.entities_lexicon import compile_lexicon, load_lexicon, tokenize
from medrwr.rewards.query_semantic import (
    get_query_semantic_image_reward,
    get_query_semantic_text_reward,
    gold_contents,
    query_semantic_text_reward,
)
from medrwr.rollout.trace import RetrievalRecord, RolloutTrace

OPTIONS = ["Pneumonia", "Pneumothorax", "Pleural effusion", "Pulmonary edema"]


class TableExtractor:
    """A fake extractor: fixed sets per text (anything else -> empty)."""

    name = "table"

    def __init__(self, table):
        self.table = table
        self.calls = []

    def extract(self, texts):
        self.calls.append(list(texts))
        return [set(self.table.get(t, set())) for t in texts]


def block(*docs: str) -> str:
    body = "\n".join(f"({i}) {d}" for i, d in enumerate(docs, 1)) if docs else "None"
    return f"<retrieve>\n{body}\n</retrieve>\n"


def completion(queries, docs_per_query, answer="B"):
    out = ""
    for q, docs in zip(queries, docs_per_query):
        out += f"<think>t</think><query>{q}</query>{block(*docs)}"
    return out + f"<think>t</think><answer>{answer}</answer>"


@pytest.fixture(scope="module")
def lexicon_extractor():
    return LexiconEntityExtractor()  # the packaged vocabulary (compiled once into the user cache)


# ------------------------------------------------------------------------------------------ σq_text table

TABLE = {
    "q1": {"pneumothorax", "trauma"},
    "q2": {"pleura"},
    "q-empty": set(),
    "d1": {"pneumothorax", "air"},
    "d2": {"effusion"},
    "d<3>": {"pneumothorax"},
    "Pneumothorax\nAir in the pleural space.": {"pneumothorax", "air", "pleura"},
    "Pneumothorax": {"pneumothorax"},
}
TEXT_CASES = [
    # (queries, docs per query, expected σq_text with gold content "Pneumothorax" + explanation)
    (["q1"], [["d1", "d2"]], 1 / 2 + 2 / 3),  # Q={pneumothorax,trauma}, K={pneumothorax,air,effusion}
    (["q1", "q2"], [["d1"], ["d2"]], 2 / 3 + 2 / 3),  # several queries: union of Q and of K
    (["q-empty"], [["d1"]], 0 + 2 / 2),  # |Q| = 0 -> that term is 0
    (["q1"], [[]], 1 / 2 + 0),  # "None" retrieve block: |K| = 0
    (["q2"], [["d<3>"]], 1 + 1),  # documents holding '<' and '>'
    ([], [], 0.0),  # no query -> 0
]


@pytest.mark.parametrize("queries,docs,expected", TEXT_CASES)
def test_query_semantic_text_table(queries, docs, expected):
    ext = TableExtractor(TABLE)
    reward = get_query_semantic_text_reward(ext)
    text = completion(queries, docs)
    got = reward(
        completions=[text], answer=["B"], options=[OPTIONS], explanation=["Air in the pleural space."]
    )
    assert got == [pytest.approx(expected)]
    # through a trace: queries and hits from the trace fields, not from the text
    trace = RolloutTrace(
        prompt_ids=[1],
        completion_text=text,
        queries=list(queries),
        retrievals=[
            RetrievalRecord(i, [q], [[Hit(d, d) for d in ds]]) for i, (q, ds) in enumerate(zip(queries, docs))
        ],
        answer="B",
        choice="B",
        valid=True,
    )
    assert (
        reward(traces=[trace], answer=["B"], options=[OPTIONS], explanation=["Air in the pleural space."])
        == got
    )


def test_same_sets_same_reward_whichever_extractor():
    sets = {"q1": {"x", "y"}, "d1": {"x"}, "Pneumothorax": {"x"}}
    text = completion(["q1"], [["d1"]])

    class Other:  # a different implementation returning the same sets
        name = "other"

        def extract(self, texts):
            return [set(sets.get(t, ())) for t in texts]

    a = get_query_semantic_text_reward(TableExtractor(sets))(
        completions=[text], answer=["B"], options=[OPTIONS]
    )
    b = get_query_semantic_text_reward(Other())(completions=[text], answer=["B"], options=[OPTIONS])
    assert a == b == [pytest.approx(0.5 + 1.0)]


def test_extractor_called_once_per_distinct_text():
    ext = TableExtractor(TABLE)
    texts = [completion(["q1"], [["d1"]])] * 8  # a GRPO group sharing gold content and documents
    get_query_semantic_text_reward(ext)(completions=texts, answer=["B"] * 8, options=[OPTIONS] * 8)
    assert len(ext.calls) == 1 and sorted(ext.calls[0]) == sorted({"q1", "d1", "Pneumothorax"})


def test_regression_gold_content_is_option_text_and_documents_come_from_the_completion(lexicon_extractor):
    """The reference reduced the gold to its letter ('b') and read documents from the prompt: both terms 0."""
    assert gold_contents(1, ["B"], options=[OPTIONS]) == ["Pneumothorax"]
    assert gold_contents(1, ["B. Pneumothorax"]) == ["Pneumothorax"]
    assert gold_contents(
        1, ["B"], prompts=[[{"role": "user", "content": "Q\nA. Pneumonia\nB. Pneumothorax"}]]
    ) == ["Pneumothorax"]
    assert gold_contents(1, ["B"], options=[OPTIONS], explanation=["Air in the pleura."]) == [
        "Pneumothorax\nAir in the pleura."
    ]
    assert gold_contents(1, ["B"], gold_content=["custom"]) == ["custom"]
    text = completion(
        ["pneumothorax after trauma"], [["Pneumothorax is air in the pleural space.", "Asthma."]]
    )
    reward = get_query_semantic_text_reward(lexicon_extractor)
    prompt = [[{"role": "user", "content": "Which?\nA. Pneumonia\nB. Pneumothorax"}]]
    got = reward(completions=[text], prompts=prompt, answer=["B"], options=[OPTIONS])[0]
    # Q = {pneumothorax, trauma?}, K = {pneumothorax, asthma, ...}, G = {pneumothorax}: both terms positive
    q, k, g = lexicon_extractor.extract(
        ["pneumothorax after trauma", "Pneumothorax is air in the pleural space.\nAsthma.", "Pneumothorax"]
    )
    assert "pneumothorax" in g and q & g and k & g
    assert got > 0.5


def test_lexicon_synonyms_abbreviations_plurals(lexicon_extractor):
    ext = lexicon_extractor
    heart, mi_text, mi_abbr = ext.extract(["heart attack", "Myocardial infarction", "history of MI"])
    assert heart == mi_text == mi_abbr and len(heart) == 1
    assert (
        ext.extract(["the patient has COPD"])[0]
        == ext.extract(["chronic obstructive pulmonary disease"])[0]
        != set()
    )
    assert ext.extract(["all patients have mi"])[0] == set()  # short lower-case words are not abbreviations
    assert ext.extract(["bilateral pleural effusions"])[0] == ext.extract(["pleural effusion"])[0] != set()
    # longest match: one concept for the phrase, not its parts
    (one,) = ext.extract(["acute myocardial infarction"])
    assert len(one) >= 1
    assert ext.extract(["", "   ", "<5 mm >"]) == [set(), set(), set()]
    assert ext.extract(["metoprolol and aspirin"])[0] >= {"metoprolol", "aspirin"}


def test_lexicon_is_cached_as_json_and_rebuilt_when_stale(tmp_path, monkeypatch):
    calls = []

    def fake_terms():
        calls.append(1)
        return (
            {
                "hp:1": ["Myocardial infarction", "Heart attack"],
                "mesh:D1": ["pneumothorax", "pneumothoraces"],
            },
            {"hp:1": "Myocardial infarction"},
            {"hp:1": ["MI"]},
        )

    monkeypatch.setattr(L, "_packaged_terms", fake_terms)
    monkeypatch.setattr(L, "_LEXICONS", {})
    lex = load_lexicon(tmp_path)
    path = L.lexicon_cache_path(tmp_path)
    data = json.loads(path.read_text())
    assert (
        data["format"] == "medrwr-lexicon"
        and data["phrases"]["heart attack"] == data["phrases"]["myocardial infarction"]
    )
    monkeypatch.setattr(L, "_LEXICONS", {})
    again = load_lexicon(tmp_path)
    assert (
        len(calls) == 1
        and again.phrases == lex.phrases
        and again.abbreviations == {"MI": lex.abbreviations["MI"]}
    )
    path.write_text("{not json")
    monkeypatch.setattr(L, "_LEXICONS", {})
    load_lexicon(tmp_path)
    assert len(calls) == 2 and json.loads(path.read_text())["version"] == L.LEXICON_VERSION


def test_compile_lexicon_merges_shared_names_and_drops_ambiguous_abbreviations():
    lex = compile_lexicon(
        {
            "hp:1": ["Kidney failure", "Renal failure"],
            "mesh:2": ["renal failure", "kidney insufficiency"],
            "hp:3": ["Pulmonary embolism"],
            "hp:4": ["Pleural effusion"],
        },
        abbreviations={"hp:3": ["PE"], "hp:4": ["PE"]},
    )
    ext = LexiconEntityExtractor(lex)
    a, b = ext.extract(["kidney insufficiency", "Kidney failure"])
    assert a == b and len(a) == 1
    assert ext.extract(["PE"]) == [set()]
    assert tokenize("Emboli-related arteries")[1] == ("related", "related")
    assert tokenize("arteries")[0][1] == "artery"


def test_scispacy_extractor_reports_missing_extra_or_model():
    from medrwr._imports import is_available
    from medrwr.errors import MissingExtraError

    if is_available("scispacy") and is_available("spacy"):
        with pytest.raises(OSError, match="placeholder"):
            E.ScispacyEntityExtractor("en_core_sci_md_not_installed")
    else:
        with pytest.raises(MissingExtraError, match=r"medrwr\[sci\]"):
            E.ScispacyEntityExtractor()
    with pytest.raises(ValueError, match="valid: 'lexicon'"):
        E.get_entity_extractor("medcat-ish")


def test_default_text_reward_uses_the_lexicon():
    text = completion(["tension pneumothorax"], [["Pneumothorax is air in the pleural space.", "Asthma."]])
    assert query_semantic_text_reward(completions=[text], answer=["B"], options=[OPTIONS]) == [
        pytest.approx(1.5)
    ]


# --------------------------------------------------------------------------------------------------- σq_img


class CountingEncoder:
    def __init__(self, inner):
        self.inner, self.name, self.dim, self.joint = inner, inner.name, inner.dim, inner.joint
        self.image_calls = 0
        self.images_encoded = 0

    def encode_images(self, images, batch_size=32):
        self.image_calls += 1
        self.images_encoded += len(images)
        return self.inner.encode_images(images, batch_size)

    def encode_texts(self, texts, batch_size=64):
        return self.inner.encode_texts(texts, batch_size)


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    from medrwr.retrieval.encoders.image import HFClipEncoder

    return HFClipEncoder(tiny_clip_dir)


def _img(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))


def test_image_reward_is_mean_cosine_and_caches_images(clip):
    enc = CountingEncoder(clip)
    reward = get_query_semantic_image_reward(enc)
    img_a, img_b = _img(0), _img(1)
    t1 = completion(["pneumothorax", "pleural air"], [["d"], ["d"]])
    t2 = completion(["edema"], [["d"]])
    t3 = "<think>no search</think><answer>B</answer>"
    got = reward(completions=[t1, t2, t3, t1], images=[[img_a], [img_a, img_b], [img_a], [img_a]])
    ia, ib = clip.encode_images([img_a, img_b])
    q = clip.encode_texts(["pneumothorax", "pleural air", "edema"])
    assert got[0] == pytest.approx(float(np.mean([ia @ q[0], ia @ q[1]])), abs=1e-5)
    assert got[1] == pytest.approx(float(np.mean([ia @ q[2], ib @ q[2]])), abs=1e-5)
    assert got[2] == 0.0 and got[3] == pytest.approx(got[0])
    assert enc.image_calls == 1 and enc.images_encoded == 2  # img_a encoded once for the whole batch
    reward(completions=[t1], images=[[img_a.copy()]])  # same content, new object: cache hit
    assert enc.image_calls == 1
    assert all(-1.0 <= x <= 1.0 for x in got)


def test_image_reward_reads_trace_images_and_data_uris(clip, tmp_path):
    import base64
    import io

    img = _img(3)
    path = tmp_path / "x.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    text = completion(["pneumothorax"], [["d"]])
    r = get_query_semantic_image_reward(clip)
    by_path = r(
        traces=[
            RolloutTrace(prompt_ids=[1], completion_text=text, queries=["pneumothorax"], images=[str(path)])
        ]
    )
    by_uri = r(completions=[text], images=[[uri]])
    by_pil = r(completions=[text], images=[img])
    assert by_path == pytest.approx(by_uri, abs=1e-5) and by_uri == pytest.approx(by_pil, abs=1e-5)
    missing = r(completions=[text], images=[[str(tmp_path / "missing.png")]])
    assert missing == [0.0]


def test_image_reward_without_joint_encoder_says_so(caplog):
    from medrwr.retrieval.encoders.image import PixelStatsEncoder

    text = completion(["pneumothorax"], [["d"]])
    for reward, needle in (
        (get_query_semantic_image_reward(None), "no image encoder is configured"),
        (get_query_semantic_image_reward(PixelStatsEncoder()), "joint=False"),
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="medrwr.rewards.query_semantic"):
            assert reward(completions=[text, text], images=[[_img(0)]] * 2) == [0.0, 0.0]
            reward(completions=[text], images=[[_img(0)]])
        warnings = [r for r in caplog.records if needle in r.getMessage()]
        assert len(warnings) == 1  # once, not per call


def test_budget_notice_and_failure_blocks_hold_no_documents():
    """Blocks the engine writes instead of documents must not count as retrieved knowledge (K) on the text path."""
    from medrwr.protocol import format_budget_notice, format_retrieval_failure

    ext = TableExtractor({**TABLE, "Search budget spent (3 searches allowed). Answer with the information you have.":
                          {"pneumothorax"}, "Retrieval failed: d1": {"pneumothorax"}})
    reward = get_query_semantic_text_reward(ext)
    for block in (format_budget_notice(3), format_retrieval_failure("d1")):
        text = f"<think>a</think><query>q1</query>{block}<think>b</think><answer>B</answer>"
        got = reward(completions=[text], answer=["B"], options=[OPTIONS], explanation=["Air in the pleural space."])
        assert got == [pytest.approx(1 / 2 + 0)]  # |K| = 0
