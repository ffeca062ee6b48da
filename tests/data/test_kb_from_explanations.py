"""``medrwr kb from-explanations``: statements, near-duplicates, tags, and a real index over them."""

from __future__ import annotations

import json

import pytest

from medrwr.data.kb import Statement, dedup, split_statements


def test_split_statements_keeps_self_contained_facts():
    text = ("Ans. is 'c' i.e., Vitamin B12. Vitamin B12 deficiency causes megaloblastic anaemia and subacute "
            "combined degeneration. It also raises methylmalonic acid levels. Option A is wrong. "
            "Dr. Addison described pernicious anaemia, e.g. in older adults. Ref: Robbins 9th ed, p. 645")
    assert split_statements(text) == [
        "Vitamin B12 deficiency causes megaloblastic anaemia and subacute combined degeneration. It also raises "
        "methylmalonic acid levels.",
        "Dr. Addison described pernicious anaemia, e.g. in older adults.",
    ]
    assert split_statements("This is why. Too short.") == []  # a dangling back-reference and a fragment
    assert split_statements("") == []


def test_dedup_drops_near_and_exact_duplicates_only():
    pytest.importorskip("datasketch", reason="MinHash dedup needs the data extra: pip install 'medrwr[data]'")
    s = [
        Statement("1", "Metformin is the first-line drug for type 2 diabetes and rarely causes lactic acidosis.", "a", "1"),
        Statement("2", "METFORMIN is the first-line drug for type 2 diabetes, and rarely causes lactic acidosis!", "b", "9"),
        Statement("3", "Metformin is the first-line drug for type 2 diabetes and rarely causes lactic acidosis in "
                       "practice.", "a", "2"),
        Statement("4", "Metformin is contraindicated when the eGFR is below 30 because lactic acidosis may follow.",
                  "a", "3"),
        Statement("5", "Heparin acts through antithrombin III and its effect is monitored with the aPTT.", "a", "4"),
    ]
    kept, dropped = dedup(s, threshold=0.7)
    assert [k.doc_id for k in kept] == ["1", "4", "5"] and dropped == 2  # first of each group kept, in order
    kept_strict, dropped_strict = dedup(s, threshold=1.0)
    assert [k.doc_id for k in kept_strict] == ["1", "3", "4", "5"] and dropped_strict == 1  # only the exact copy


def test_from_explanations_builds_a_tagged_index(tmp_path):
    from medrwr.cli.app import main
    from medrwr.retrieval.index.hybrid import HybridRetriever

    medmcqa = tmp_path / "medmcqa.jsonl"
    rows = [
        {"id": "m1", "question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1,
         "exp": "Ans. is 'b' i.e., Iron. Iron deficiency anaemia is microcytic and hypochromic on the blood film. "
                "It is the commonest anaemia worldwide."},
        {"id": "m2", "question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0,
         "exp": "Iron deficiency anaemia is microcytic and hypochromic on the blood film. It is the commonest "
                "anaemia globally."},  # a near-duplicate of m1's statement (one word differs)
        {"id": "m3", "question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2, "exp": None},
    ]
    medmcqa.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ours = tmp_path / "echo_mcq.jsonl"
    ours.write_text(json.dumps({"id": 7, "question": "q", "options": {"A": "x", "B": "y"}, "answer": "A",
                                "explanation": "A bicuspid aortic valve predisposes to aortic stenosis at a "
                                               "younger age than a tricuspid valve."}) + "\n")
    out = tmp_path / "kb"
    assert main(["kb", "from-explanations", "--data", str(medmcqa), "--data", str(ours), "--out", str(out),
                 "--bm25-only", "--no-progress"]) == 0
    passages = [json.loads(x) for x in (out / "passages.jsonl").read_text().splitlines()]
    assert [p["id"] for p in passages] == ["medmcqa:m1:0", "echo_mcq:7:0"]
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    assert manifest["explanation_kb"]["near_duplicates"] == 1 and manifest["doc_count"] == 2
    with HybridRetriever.load(out / "index") as r:
        hit = r.search(["bicuspid aortic valve stenosis"], k=1)[0][0]
    assert (hit.doc_id, hit.source) == ("echo_mcq:7:0", "echo_mcq")

    assert main(["kb", "from-explanations", "--data", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 1


def test_from_explanations_needs_an_explanation_column(tmp_path):
    from medrwr.config import load_config
    from medrwr.data.kb import build_explanation_kb
    from medrwr.errors import SynthesisError

    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"id": 1, "question": "q"}) + "\n")
    with pytest.raises(SynthesisError, match="'explanation' or 'exp' column"):
        build_explanation_kb([f], tmp_path / "kb", load_config(None, []), dense=False, show_progress=False)


def test_embedding_dedup_is_the_fallback(tmp_path, cache):
    """Without datasketch (``data.kb_dedup: auto``) near-duplicates are found by cosine of the packaged encoder."""
    from medrwr.data.kb import dedup_embedding
    from medrwr.retrieval.encoders.text import load_text_encoder

    s = [
        Statement("1", "Metformin is the first-line drug for type 2 diabetes and rarely causes lactic acidosis.", "a", "1"),
        Statement("2", "Metformin is the first line drug for type-2 diabetes and it rarely causes lactic acidosis.", "a", "2"),
        Statement("3", "Heparin acts through antithrombin III and its effect is monitored with the aPTT.", "a", "3"),
    ]
    kept, dropped = dedup_embedding(s, load_text_encoder("default", device="cpu"), cosine=0.95)
    assert [k.doc_id for k in kept] == ["1", "3"] and dropped == 1
