"""The ``medevalkit`` preset: MedEvalKit's verdicts (HEAD ``9b12e3b``), re-implemented from its ``utils/utils.py``,
the per-benchmark ``cal_metrics`` and ``utils/MMMU`` (docs/BENCHMARKS.md §0), so numbers line up with papers that
used it. Its quirks are kept on purpose ("normal" counts as "no", an empty answer guesses "A", SLAKE's capitalised
"Yes" skips the yes/no rule, MMMU validation open items are always wrong); its crashes (empty ``rouge`` hypothesis,
a bare ``0`` from the token-F1 helper, MMMU test) and its mis-ordered P/R/F1 fields are not (see
docs/evaluation-scoring.md).
"""

from __future__ import annotations

import random

from medrwr.eval.record import EvalRecord, Verdict
from medrwr.eval.scoring._text import boxed_str as _boxed
from medrwr.eval.scoring._text import extract_tag, most_similar_index
from medrwr.eval.scoring.mmmu import judge_mmmu

__all__ = [
    "extract_tag",
    "judge_close_end",
    "judge_judgement",
    "judge_medevalkit",
    "judge_multi_choice",
    "most_similar_index",
    "open_end_metrics",
    "parse_response",
]

PRESET = "medevalkit"
_MARKERS = ("**answer**:", "**answer**", "*answer*:", "**answer:**", "answer is", "answer:", "答案:",
            "final answer", "final answer is")


def parse_response(response: str) -> str:
    """Lower-case; boxed content if "boxed" occurs, else the ``<answer>`` blocks; cut after each marker in turn."""
    response = response.lower()
    if "boxed" in response:
        response = _boxed(response)
    elif "<answer>" in response:
        response = extract_tag(response, "answer")
    for marker in _MARKERS:
        if marker in response:
            response = response.split(marker)[-1]
    return response


def judge_multi_choice(choices: list[str], answer: str, response: str) -> tuple[bool, str, str]:
    """MedEvalKit's multiple-choice matcher (§0.4): (correct, what it settled on, which path decided)."""
    alphas = [chr(ord("a") + i) for i in range(len(choices))]
    response = response.lower()
    if response.split("\n\n")[0] in alphas:
        response = response.split("\n\n")[0]
    elif response.split("\n\n")[-1].split(".")[0] in alphas:
        response = response.split("\n\n")[-1].split(".")[0]
    response = parse_response(response).strip().lower().replace("\n", "")
    split = response.split(".")[0].split(":")[-1]
    low = [c.lower() for c in choices]
    answer = answer.strip().lower()
    if split == answer:
        return True, split, "equal"
    if split in alphas:
        return low[ord(split) - ord("a")] == answer, split, "letter"
    if split in low:
        return answer in alphas and split == low[ord(answer) - ord("a")], split, "choice"
    i = most_similar_index(low, response)
    return (alphas[i] == answer or low[i] == answer), alphas[i], "similarity"


def judge_judgement(answer: str, response: str) -> bool:
    """Yes/no by substrings (§0.5): exactly one of "yes"/"no" occurs, and the gold occurs."""
    answer = answer.lower()
    response = parse_response(response).replace("\n", "").replace(".", "")
    return (("yes" in response) ^ ("no" in response)) and answer in response


def judge_close_end(answer: str, response: str) -> bool:
    """Closed non-yes/no (§0.6): exact equality after ``parse_response`` and dropping newlines and periods."""
    return parse_response(response).replace("\n", "").replace(".", "") == answer.lower()


def open_end_metrics(answer: str, response: str) -> tuple[bool, float, float]:
    """(EM, token recall, token F1) as ``judge_open_end_vqa`` means them, in the right order and without crashing
    on an empty side (MedEvalKit returns them as (F1, P, R), stores them as (P, R, F1), and raises on empties)."""
    answer = answer.lower()
    response = parse_response(response)
    pred, gold = set(response.lower().split()), set(answer.lower().split())
    common = pred & gold
    recall = len(common) / len(gold) if pred and gold else 0.0
    prec = len(common) / len(pred) if pred and gold else 0.0
    f1 = 2 * prec * recall / (prec + recall) if prec + recall else 0.0
    return response == answer, recall, f1


def _pre_extract(response: str) -> str:
    """VQA-RAD / PathVQA / SLAKE ``cal_metrics``: boxed content, else the ``<answer>`` blocks."""
    if _boxed(response) != "None":
        return _boxed(response)
    if "<answer>" in response:
        return extract_tag(response, "answer")
    return response


def judge_medevalkit(record: EvalRecord, response: str | None, *, rng: random.Random | None = None) -> Verdict:
    """MedEvalKit's verdict on one item, routed as its loader for ``record.benchmark`` routes it."""
    response = response or ""
    bench = record.benchmark
    if bench == "mmmu":
        return judge_mmmu(record, response, rng=rng, preset=PRESET)
    if record.answer_type == "mcq":
        assert record.options is not None
        choices = record.meta.get("medevalkit_choices") or [f"{k}. {v}" for k, v in record.options.items()]
        answer = str(record.meta.get("medevalkit_answer") or record.answer)
        text = response if bench == "pmc_vqa" else extract_tag(response, "answer")
        ok, parsed, how = judge_multi_choice(list(choices), answer, text)
        return Verdict(ok, parsed.upper() if len(parsed) == 1 else parsed, "mcq", PRESET, note=how)
    text = _pre_extract(response)
    if bench == "slake":
        if record.answer_type == "open":
            return _open(record.answer, text)
        # MedEvalKit tests the gold as stored ("Yes"), so its yes/no branch never fires on SLAKE
        if record.answer in ("yes", "no"):
            return Verdict(judge_judgement(record.answer, text), text, "yes_no", PRESET)
        return Verdict(judge_close_end(record.answer, text), text, "closed", PRESET)
    # VQA-RAD, PathVQA and generic items: closed means a yes/no gold
    text = text.lower().strip()
    gold = record.answer.lower().strip()
    if gold in ("yes", "no"):
        return Verdict(judge_judgement(gold, text), text, "yes_no", PRESET)
    return _open(gold, text)


def _open(answer: str, text: str) -> Verdict:
    em, recall, f1 = open_end_metrics(answer, text)
    return Verdict(em, parse_response(text), "open", PRESET, em=float(em), recall=recall, f1=f1)
