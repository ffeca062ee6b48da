"""The rollout loop on the scripted fake backend, with the real Qwen2.5 tokenizer (fast: no model)."""

from __future__ import annotations

import itertools
import json
import time

import pytest

from medrwr import protocol
from medrwr.config import CDIRConfig, RolloutConfig
from medrwr.errors import RetrievalTimeout
from medrwr.protocol import option_letters_in
from medrwr.retrieval.base import (
    FakeImageRetriever,
    FakeRetriever,
    Hit,
    ImageHit,
)
from medrwr.rollout.backends.base import BackendError, ScriptedBackend
from medrwr.rollout.cdir import CDIR_QUERY, CDIR_THINK
from medrwr.rollout.engine import (
    RolloutDriftError,
    RolloutEngine,
    RolloutRequest,
)
from medrwr.rollout.trace import RolloutTrace, render_trace
from medrwr.rollout.transcript import Transcript

DOCS = {
    "d1": "Lobar pneumonia shows consolidation with air bronchograms on chest radiographs.",
    "d2": "Pneumothorax shows a visceral pleural line without lung markings beyond it.",
    "d3": "Pleural effusion blunts the costophrenic angle on an upright film.",
}

TWO_ROUNDS = [
    "<think>The opacity could be pneumonia.</think>\n<query>pneumonia consolidation radiograph</query>",
    "<think>Check the pleura too.</think>\n<query>pneumothorax pleural line</query>",
    "<think>Consolidation fits best.</think>\n<answer>B</answer>",
]


def engine_for(tok, scripts, *, letter_probs=None, retriever=None, config=None, **kw):
    backend = ScriptedBackend(tok, scripts, letter_probs=letter_probs, **kw)
    retriever = retriever if retriever is not None else FakeRetriever(DOCS)
    return RolloutEngine(backend, retriever, config or RolloutConfig()), backend, retriever


def ask(n=1, **kw):
    return [RolloutRequest("Which finding?", ["effusion", "pneumonia", "pneumothorax"], **kw) for _ in range(n)]


def assert_token_exact(tok, tr: RolloutTrace, model_text: str) -> None:
    tr.check()
    assert tok.decode(tr.model_token_ids()) == model_text
    inserted = "".join(s.text for s in tr.spans if not s.by_model)
    assert tok.decode(tr.inserted_token_ids()) == inserted
    assert "".join(s.text for s in tr.spans) == tr.completion_text == tok.decode(tr.completion_ids)
    for s in tr.spans:
        assert all(m == int(s.by_model) for m in tr.completion_mask[s.start : s.end])
    assert all(lp == 0.0 for lp, m in zip(tr.logprobs, tr.completion_mask) if m == 0)


def test_multi_round_transcript_is_token_exact(qwen_tokenizer):
    tok = qwen_tokenizer
    eng, backend, _ = engine_for(tok, {"0": TWO_ROUNDS}, letter_probs={"0": {"A": 0.2, "B": 0.7, "C": 0.1}})
    (tr,) = eng.run(ask())
    assert_token_exact(tok, tr, "".join(TWO_ROUNDS))
    assert tr.stop_reason == "answer" and tr.error is None
    assert tr.valid, tr.metadata.get("invalid")
    assert tr.rounds == 2 and len(tr.retrievals) == 2
    assert tr.queries == ["pneumonia consolidation radiograph", "pneumothorax pleural line"]
    assert tr.retrievals[0].hits[0][0].doc_id == "d1"
    assert tr.answer == "B" and tr.choice == "B"
    # Inserted blocks are exactly the protocol's retrieve blocks of the hits, one per query.
    blocks = [s.text for s in tr.spans if s.kind == "retrieve"]
    assert blocks == [protocol.format_retrieval([h.text for h in r.hits[0]]) for r in tr.retrievals]
    # Each turn's ids extended the previous turn's ids exactly (what the backend was fed).
    fed = [c[0]["ids"] for c in backend.calls]
    assert len(fed) == 3
    for a, b in itertools.pairwise(fed):
        assert b[: len(a)] == a and len(b) > len(a)
    assert fed[-1] == tr.prompt_ids + tr.completion_ids[: len(fed[-1]) - len(tr.prompt_ids)]
    kinds = [s.kind for s in tr.spans if s.kind != "text"]
    assert kinds == ["think", "query", "retrieve", "think", "query", "retrieve", "think", "answer"]


def test_confidence_and_option_distribution(qwen_tokenizer):
    probs = {"A": 0.2, "B": 0.6, "C": 0.1, "D": 0.1}  # D is not an option of this question
    eng, _, _ = engine_for(qwen_tokenizer, {"0": TWO_ROUNDS}, letter_probs={"0": probs})
    (tr,) = eng.run(ask())
    assert tr.confidence == pytest.approx(0.6)
    assert set(tr.option_probs) == {"A", "B", "C"}
    assert sum(tr.option_probs.values()) == pytest.approx(1.0)
    assert tr.option_probs["B"] == pytest.approx(0.6 / 0.9)


@pytest.mark.parametrize("answer", ["<answer> b</answer>", "<answer>\n  B. pneumonia</answer>", "<answer>(B)</answer>"])
def test_confidence_reads_first_non_whitespace_token(qwen_tokenizer, answer):
    tok = qwen_tokenizer
    script = ["<think>Direct.</think>\n", answer]
    eng, _, _ = engine_for(tok, {"0": script}, letter_probs={"0": {"A": 0.25, "B": 0.5, "C": 0.25}})
    (tr,) = eng.run(ask())
    span = next(s for s in tr.spans if s.kind == "answer")
    assert tr.stop_reason == "answer"
    first_tokens = [tok.decode([t]) for t in tr.completion_ids[span.start : span.end]]
    # The token read is the first one holding a non-whitespace character after "<answer>".
    text_after = "".join(first_tokens).split(">", 1)[1]
    assert text_after.strip()[0] in "bB("
    assert tr.confidence == pytest.approx(0.5)  # the letter's token, not "(" or whitespace
    assert tr.choice == "B"
    assert tr.option_probs["B"] == pytest.approx(0.5)


def test_one_batched_search_per_step(qwen_tokenizer):
    scripts = {
        "0": TWO_ROUNDS,
        "1": ["<think>Easy.</think>\n<answer>A</answer>"],
        "2": ["<think>Look up.</think>\n<query>pleural effusion angle</query>", "<think>Ok.</think>\n<answer>A</answer>"],
    }
    eng, backend, retriever = engine_for(qwen_tokenizer, scripts)
    traces = eng.run([RolloutRequest("Q?", ["a", "b"], request_id=str(i)) for i in range(3)])
    # Step 1: rows 0 and 2 paused at a query -> one call with both queries; step 2: row 0 alone.
    assert retriever.calls == [
        ["pneumonia consolidation radiograph", "pleural effusion angle"],
        ["pneumothorax pleural line"],
    ]
    assert [len(c) for c in backend.calls] == [3, 2, 1]  # finished rows leave the batch
    assert [t.rounds for t in traces] == [2, 0, 1]
    assert all(t.valid and t.stop_reason == "answer" for t in traces)
    assert traces[2].retrievals[0].hits[0][0].doc_id == "d3"


def test_admitted_requests_join_at_turn_boundaries_and_finish_early(qwen_tokenizer):
    """Continuous batching (``run(admit=...)``): a request admitted before turn 2 shares that generate call; each
    row's ``finish`` event comes when it is done, not when the batch ends; traces of admitted rows come last."""
    scripts = {"long": TWO_ROUNDS, "late": ["<think>Easy.</think>\n<answer>A</answer>"]}
    eng, backend, _ = engine_for(qwen_tokenizer, scripts)
    pending = [[], [RolloutRequest("Q2?", ["a", "b"], request_id="late")]]
    finished: list[str] = []

    def on_event(ev):
        if ev.kind == "finish":
            finished.append(ev.request_id)
            assert ev.data["trace"].completion_text  # finalised before it is reported

    traces = eng.run([RolloutRequest("Q?", ["a", "b"], request_id="long")], on_event=on_event,
                     admit=lambda: pending.pop(0) if pending else [])
    assert [len(c) for c in backend.calls] == [1, 2, 1]  # turn 2 ran both rows in one call
    assert finished == ["late", "long"]
    assert [t.metadata["request_id"] for t in traces] == ["long", "late"]
    assert [t.answer for t in traces] == ["B", "A"] and traces[0].rounds == 2
    assert eng.stats.model_tokens == sum(t.num_model_tokens for t in traces)  # each row finalised once


def test_several_queries_in_one_turn(qwen_tokenizer):
    """A backend that overshoots the first </query> (here: a scripted piece) gets every query retrieved."""
    tok = qwen_tokenizer
    script = [
        "<think>Two things.</think>\n<query>pneumonia</query>\n<query>pneumothorax</query>",
        "<think>Ok.</think>\n<answer>B</answer>",
    ]

    class Overshoot(ScriptedBackend):
        def generate(self, states, stop, max_new_tokens, **kw):
            conts = super().generate(states, ["</query>\n<query>pneumothorax</query>", "</answer>"], max_new_tokens, **kw)
            for c in conts:  # it reports the stop string it ended on, as vLLM does
                c.stop_string = "</query>" if c.stop_string and c.stop_string.endswith("</query>") else c.stop_string
            return conts

    retriever = FakeRetriever(DOCS)
    for qpt, expect in ((0, ["pneumonia", "pneumothorax"]), (1, ["pneumonia"])):
        backend = Overshoot(tok, {"0": script})
        eng = RolloutEngine(backend, retriever, RolloutConfig(queries_per_turn=qpt))
        (tr,) = eng.run(ask())
        assert retriever.calls[-1] == expect
        assert len([s for s in tr.spans if s.kind == "retrieve"]) == len(expect)
        assert tr.rounds == 1
        tr.check()


def test_max_rounds_notice_then_stop(qwen_tokenizer):
    tok = qwen_tokenizer
    q = "<think>More.</think>\n<query>pneumonia</query>"
    eng, _, retriever = engine_for(tok, {"0": [q, q, q, "<think>x</think><answer>A</answer>"]},
                                   config=RolloutConfig(max_rounds=1))
    (tr,) = eng.run(ask())
    assert len(retriever.calls) == 1 and tr.rounds == 1 and len(tr.retrievals) == 1
    assert tr.stop_reason == "max_rounds" and "budget" in tr.error
    assert tr.queries == ["pneumonia"] * 3
    notices = [s.text for s in tr.spans if s.kind == "retrieve"][1:]
    assert len(notices) == 1 and "Search budget spent" in notices[0]
    tr.check()


def test_max_rounds_notice_lets_the_model_answer(qwen_tokenizer):
    tok = qwen_tokenizer
    script = ["<think>a</think>\n<query>pneumonia</query>", "<think>b</think>\n<answer>B</answer>"]
    eng, _, retriever = engine_for(tok, {"0": script}, config=RolloutConfig(max_rounds=0))
    (tr,) = eng.run(ask())
    assert retriever.calls == [] and tr.rounds == 0
    assert tr.stop_reason == "answer" and tr.valid  # the notice is a retrieve block: grammar holds
    assert tr.retrievals == []


def test_turn_budget(qwen_tokenizer):
    tok = qwen_tokenizer
    eng, backend, _ = engine_for(tok, {"0": ["<think>" + "word " * 50 + "</think><answer>A</answer>"]},
                                 config=RolloutConfig(max_new_tokens_per_turn=7, max_total_new_tokens=100))
    (tr,) = eng.run(ask())
    assert tr.stop_reason == "max_tokens" and "max_new_tokens_per_turn" in tr.error
    assert tr.num_model_tokens == 7 and backend.calls[0][0]["budget"] == 7
    assert not tr.valid


def test_total_budget(qwen_tokenizer):
    tok = qwen_tokenizer
    n1 = len(tok.encode(TWO_ROUNDS[0]))
    eng, backend, _ = engine_for(tok, {"0": TWO_ROUNDS}, config=RolloutConfig(max_new_tokens_per_turn=n1 + 5,
                                                                              max_total_new_tokens=n1 + 8))
    (tr,) = eng.run(ask())
    assert backend.calls[0][0]["budget"] == n1 + 5
    assert backend.calls[1][0]["budget"] == 8
    assert tr.num_model_tokens == n1 + 8 and tr.stop_reason == "max_tokens"
    assert "max_total_new_tokens" in tr.error
    assert tr.num_inserted_tokens > 0  # inserted tokens do not count against the budget


def test_inserted_tokens_are_capped_by_truncating_documents(qwen_tokenizer):
    tok = qwen_tokenizer
    long_docs = {f"d{i}": f"pneumonia finding {i} " + " ".join(f"detail{i}x{j}" for j in range(200)) for i in range(3)}
    eng, _, _ = engine_for(tok, {"0": TWO_ROUNDS[:1] + TWO_ROUNDS[2:]}, retriever=FakeRetriever(long_docs),
                           config=RolloutConfig(max_inserted_tokens=60))
    (tr,) = eng.run(ask())
    (block,) = [s for s in tr.spans if s.kind == "retrieve"]
    assert block.end - block.start <= 60
    assert block.text.startswith("<retrieve>\n(1) pneumonia finding") and block.text.endswith("</retrieve>\n")
    assert "(3) pneumonia finding" in block.text  # every document keeps a share
    assert tr.retrievals[0].truncated and tr.retrievals[0].inserted_tokens == [block.end - block.start]
    assert tr.valid
    assert tok.decode(tr.model_token_ids()) == TWO_ROUNDS[0] + TWO_ROUNDS[2]  # model text untouched


class _Boom:
    def __init__(self, exc=None, sleep=0.0, wrong_count=False):
        self.exc, self.sleep, self.wrong_count = exc, sleep, wrong_count

    def search(self, queries, k=3, mode=None):
        time.sleep(self.sleep)
        if self.exc:
            raise self.exc
        return [] if self.wrong_count else [[Hit("x", "text")] for _ in queries]


@pytest.mark.parametrize(
    "retriever,needle",
    [
        (FakeRetriever(DOCS, fail_with=RetrievalTimeout("server too slow", ["q"])), "RetrievalTimeout: server too slow"),
        (_Boom(ValueError("index corrupted")), "ValueError: index corrupted"),
        (_Boom(wrong_count=True), "0 result lists for 1 queries"),
        (_Boom(sleep=2.0), "did not answer within 0.2 s"),
        (None, "no retriever configured"),
    ],
)
def test_failing_retriever_inserts_a_failure_block_and_continues(qwen_tokenizer, retriever, needle):
    tok = qwen_tokenizer
    backend = ScriptedBackend(tok, {"0": [TWO_ROUNDS[0], TWO_ROUNDS[2]]})
    eng = RolloutEngine(backend, retriever, RolloutConfig(retrieval_timeout_s=0.2))
    (tr,) = eng.run(ask())
    assert tr.stop_reason == "answer" and tr.valid
    (rec,) = tr.retrievals
    assert needle in rec.error and rec.hits == [[]]
    (block,) = [s.text for s in tr.spans if s.kind == "retrieve"]
    assert block.startswith("<retrieve>\nRetrieval failed:") and needle.split(":")[0] in block


@pytest.mark.parametrize(
    "script,reason,error",
    [
        (["<think>a</think>\n<query> </query>"], "error", "empty_query"),
        (["<think>a</think> oops</query>"], "error", "malformed_query"),
        (["<think>I am not sure.</think>"], "eos", "without an answer"),
        (["<think>a</think> B</answer>"], "error", "malformed_answer"),
    ],
)
def test_model_mistakes_end_the_row_without_raising(qwen_tokenizer, script, reason, error):
    eng, _, retriever = engine_for(qwen_tokenizer, {"0": script})
    (tr,) = eng.run(ask())
    assert tr.stop_reason == reason and error in tr.error
    assert retriever.calls == []
    assert not tr.valid
    tr.check()


def test_prefix_check_catches_retokenisation_drift(qwen_tokenizer, monkeypatch):
    tok = qwen_tokenizer
    script = ["<think>a</think>\n<query>pneumonia</query>", "<think>b</think>\n<answer>B</answer>"]
    eng, _, _ = engine_for(tok, {"0": script})

    def naive(transcript):  # the classic bug: decode the running text and encode it again
        text = tok.decode(transcript.prompt_ids + transcript.ids)
        return tok.encode(text, add_special_tokens=False)

    monkeypatch.setattr(Transcript, "sequence", naive)
    with pytest.raises(RolloutDriftError, match="do not extend the previous turn"):
        eng.run(ask())


def test_prefix_check_catches_an_edited_completion(qwen_tokenizer, monkeypatch):
    tok = qwen_tokenizer
    eng, _, _ = engine_for(tok, {"0": TWO_ROUNDS})
    original = eng._retrieve

    def tamper(pending):
        original(pending)
        for row, _ in pending:
            row.transcript.ids[0] += 1

    monkeypatch.setattr(eng, "_retrieve", tamper)
    with pytest.raises(RolloutDriftError, match="first difference at position"):
        eng.run(ask())


def test_backend_overshooting_the_budget_is_a_bug(qwen_tokenizer):
    class Greedy(ScriptedBackend):
        def generate(self, states, stop, max_new_tokens, **kw):
            return super().generate(states, stop, [1000] * len(states), **kw)

    eng = RolloutEngine(Greedy(qwen_tokenizer, {"0": ["<think>" + "a " * 40 + "</think>"]}), None,
                        RolloutConfig(max_new_tokens_per_turn=5, max_total_new_tokens=5))
    with pytest.raises(BackendError, match="for a budget of 5"):
        eng.run(ask())


def test_trace_json_round_trip(qwen_tokenizer):
    eng, _, _ = engine_for(qwen_tokenizer, {"0": TWO_ROUNDS}, letter_probs={"0": {"A": 0.3, "B": 0.7}})
    (tr,) = eng.run(ask())
    data = json.loads(tr.to_json())
    assert data["completion_ids"] == tr.completion_ids and data["completion_mask"] == tr.completion_mask
    back = RolloutTrace.from_json(tr.to_json())
    assert back == tr
    assert back.hits == tr.hits and back.spans == tr.spans
    data["future_field"] = 1
    assert RolloutTrace.from_dict(data).metadata["_unknown_fields"] == {"future_field": 1}


def test_rollout_batch_is_what_trl_needs(qwen_tokenizer):
    tok = qwen_tokenizer
    eng, _, _ = engine_for(tok, {"0": TWO_ROUNDS, "1": ["<think>x</think>\n<answer>A</answer>"]})
    prompts = [
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "Q?\nA. one\nB. two"}],
        [{"role": "user", "content": "Q2?\nA. one\nB. two\nC. three"}],
    ]
    out = eng.rollout_batch(prompts)
    assert set(out) == {"prompt_ids", "completion_ids", "env_mask", "logprobs", "traces"}
    for i, tr in enumerate(out["traces"]):
        assert out["prompt_ids"][i] == tr.prompt_ids == eng.backend.prepare_prompt(prompts[i]).prompt_ids
        assert len(out["completion_ids"][i]) == len(out["env_mask"][i]) == len(out["logprobs"][i])
        assert out["env_mask"][i] == tr.completion_mask
    assert 0 in out["env_mask"][0] and 0 not in out["env_mask"][1]
    assert option_letters_in(prompts[1][-1]["content"]) == "ABC"
    # The TRL-shaped function: same keys, one completion per prompt entry.
    eng2, _, _ = engine_for(tok, {"0": TWO_ROUNDS, "1": ["<think>x</think>\n<answer>A</answer>"]})
    out2 = eng2.rollout_func()(prompts, trainer=None)
    assert out2["completion_ids"] == out["completion_ids"] and out2["env_mask"] == out["env_mask"]


def test_render_trace(qwen_tokenizer):
    from rich.console import Console

    eng, _, _ = engine_for(qwen_tokenizer, {"0": TWO_ROUNDS})
    (tr,) = eng.run(ask())
    console = Console(record=True, width=100)
    console.print(render_trace(tr))
    out = console.export_text()
    for needle in ("query (model", "retrieve (inserted", "answer (model", "pneumothorax pleural line", "stop"):
        assert needle in out


# ------------------------------------------------------------------------------------------ CDIR (fake)


CASE = ImageHit("case-1", "", "Chest radiograph: right lower lobe consolidation.", 0.9)


def _cdir_engine(tok, tmp_path, conf, threshold=0.8):
    from PIL import Image

    img_path = tmp_path / "case.png"
    Image.new("RGB", (32, 32), (120, 10, 10)).save(img_path)
    case = ImageHit("case-1", str(img_path), CASE.report, 0.9)
    script = TWO_ROUNDS + ["<think>The case shows consolidation.</think>\n<answer>B</answer>"]
    backend = ScriptedBackend(tok, {"0": script}, letter_probs={"0": {"A": 1 - conf, "B": conf}}, supports_images=True)
    image_retriever = FakeImageRetriever([case])
    eng = RolloutEngine(backend, FakeRetriever(DOCS), image_retriever=image_retriever,
                        cdir=CDIRConfig(enabled=True, threshold=threshold))
    question_image = Image.new("RGB", (32, 32), (10, 10, 200))
    return eng, backend, image_retriever, question_image


def test_cdir_triggers_below_threshold(qwen_tokenizer, tmp_path):
    tok = qwen_tokenizer
    eng, backend, image_retriever, img = _cdir_engine(tok, tmp_path, conf=0.4)
    (tr,) = eng.run(ask(images=[img]))
    c = tr.cdir
    assert c.triggered and image_retriever.calls == 1
    assert c.first.confidence == pytest.approx(0.4) and c.second.confidence == pytest.approx(0.4)
    assert c.first.choice == "B" and "Consolidation fits best" in c.first.dropped_text
    assert c.cases[0].image_id == "case-1"
    # The final turn was replaced; fixed blocks are inserted (mask 0); the result is grammar-valid.
    assert "Consolidation fits best" not in tr.completion_text
    assert CDIR_THINK in tr.completion_text and CDIR_QUERY in tr.completion_text
    assert "Report: Chest radiograph: right lower lobe consolidation." in tr.completion_text
    fixed = [s for s in tr.spans if s.start >= c.inserted_start and s.end <= c.inserted_end]
    assert [s.kind for s in fixed] == ["think", "query", "retrieve"] and not any(s.by_model for s in fixed)
    assert tr.valid and tr.stop_reason == "answer" and tr.choice == "B"
    tr.check()
    # The regenerated turn was fed both images; the first turns only the question's.
    assert [c[0]["images"] for c in backend.calls] == [1, 1, 1, 2]
    assert len(tr.images) == 2 and tr.images[1].endswith("case.png")
    assert RolloutTrace.from_json(tr.to_json()) == tr  # both answers survive serialisation


def test_cdir_not_triggered_at_or_above_threshold(qwen_tokenizer, tmp_path):
    eng, backend, image_retriever, img = _cdir_engine(qwen_tokenizer, tmp_path, conf=0.9)
    (tr,) = eng.run(ask(images=[img]))
    assert tr.cdir.triggered is False and "threshold" in tr.cdir.reason
    assert image_retriever.calls == 0 and len(backend.calls) == 3
    assert "Consolidation fits best" in tr.completion_text


def test_cdir_image_search_failure_keeps_first_answer(qwen_tokenizer, tmp_path):
    eng, _, _, img = _cdir_engine(qwen_tokenizer, tmp_path, conf=0.1)

    class Broken:
        def search_images(self, images, k=1):
            raise RuntimeError("image index offline")

    eng.image_retriever = Broken()
    (tr,) = eng.run(ask(images=[img]))
    assert tr.cdir.triggered is False and "image index offline" in tr.cdir.error
    assert tr.answer == "B" and tr.confidence == pytest.approx(0.1)


def test_text_only_backend_rejects_images(qwen_tokenizer):
    from PIL import Image

    eng, _, _ = engine_for(qwen_tokenizer, {"0": TWO_ROUNDS})
    with pytest.raises(BackendError, match="Qwen2.5-VL"):
        eng.run(ask(images=[Image.new("RGB", (8, 8))]))


# ---------------------------------------------------------------------- the transcript on its own


def test_transcript_operations_keep_the_invariant(qwen_tokenizer):
    from medrwr.rollout.transcript import TokenCodec

    codec = TokenCodec(qwen_tokenizer)
    t = Transcript(codec.encode("user: Q?\nassistant: "), codec, name="r")
    fed = t.next_input()
    ids = codec.encode("<think>a</think><query>q</query>")
    turn = t.append_model(ids, [-0.1] * len(ids))
    assert [s.kind for s in t.spans] == ["think", "query"] and turn.text.endswith("</query>")
    t.insert_after_turn("retrieve", "<retrieve>\n(1) d\n</retrieve>\n")
    assert t.mask == [1] * turn.end + [0] * (len(t) - turn.end)  # "\n" first: the turn ended in ">"
    assert t.next_input()[: len(fed) + turn.end] == fed + turn.ids  # extends the previous input
    ids = codec.encode("<think>b</think><answer>B</answer>")
    answer = t.append_model(ids, [-0.2] * len(ids))
    dropped, lps = t.truncate(answer.start)
    assert dropped == answer.ids and lps == [-0.2] * len(ids) and len(t) == answer.start
    assert t.model_tokens == turn.end and t.generated_tokens == turn.end + len(answer.ids)
    t.insert("think", "<think>look again</think>")
    t.next_input()  # a deliberate truncation is not drift
    t.ids[0] += 1
    with pytest.raises(RolloutDriftError, match="row r: the ids fed to turn 3"):
        t.next_input()


def test_backend_registry_lists_the_valid_names():
    import typing

    from medrwr.config import ModelConfig
    from medrwr.errors import ConfigError
    from medrwr.rollout.backends import BACKENDS, build_backend

    assert set(BACKENDS) == set(typing.get_args(typing.get_type_hints(ModelConfig)["backend"]))
    assert BACKENDS["vllm"].extra == "vllm" and all(s.supports_images for s in BACKENDS.values())
    with pytest.raises(ConfigError, match="choose one of: hf, vllm"):
        build_backend(ModelConfig(backend="tgi"), RolloutConfig())  # type: ignore[arg-type]
