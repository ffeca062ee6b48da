"""The ``llava_med`` preset: the LLaVA-Med convention most RL papers report on SLAKE (English) and VQA-RAD.

Closed items (``answer_type == closed``) are right when the normalised gold occurs in the normalised answer;
open items are scored by token recall (LLaVA-Med's ``calculate_f1score`` recall: share of gold tokens the answer
covers), and count as correct only at full recall. MCQ items fall back to the standard letter rule.
"""

from __future__ import annotations

import re
from collections import Counter

from medrwr.eval.record import EvalRecord, Verdict
from medrwr.eval.scoring._text import extract_answer

__all__ = ["judge_llava_med", "normalize_word", "token_recall"]

PRESET = "llava_med"
_PUNCT_RE = re.compile(r"[^\w\s]")


def normalize_word(text: str) -> str:
    """Lower-case, punctuation dropped, whitespace collapsed (LLaVA-Med's ``normalize_word`` in effect)."""
    return " ".join(_PUNCT_RE.sub(" ", text.lower()).split())


def token_recall(gold: str, pred: str) -> tuple[float, float]:
    """(recall, F1) over word counts, as LLaVA-Med's ``calculate_f1score`` computes them."""
    cand, ref = Counter(normalize_word(pred).split()), Counter(normalize_word(gold).split())
    if not cand or not ref:
        return 0.0, 0.0
    tp = sum(cand[w] for w in cand if w in ref)
    fp = sum(cand[w] for w in cand if w not in ref)
    fn = sum(ref[w] for w in ref if w not in cand)
    if tp == 0:
        return 0.0, 0.0
    p, r = tp / (tp + fp), tp / (tp + fn)
    return r, 2 * p * r / (p + r)


def judge_llava_med(record: EvalRecord, response: str | None) -> Verdict:
    if record.answer_type == "mcq":
        from medrwr.eval.scoring.standard import judge_standard

        return judge_standard(record, response, preset=PRESET)
    text, _ = extract_answer(response)
    gold, pred = normalize_word(record.answer), normalize_word(text)
    if record.answer_type == "closed":
        ok = bool(gold) and gold in pred  # a bare substring, as LLaVA-Med: "no" is found in "normal"
        return Verdict(ok, text, "yes_no" if record.is_yes_no else "closed", PRESET)
    from medrwr.eval.scoring.standard import golds_of

    golds = golds_of(record)
    recall, f1 = max(token_recall(g, text) for g in golds)
    em = float(any(normalize_word(g) and normalize_word(g) == pred for g in golds))
    return Verdict(recall >= 1.0, text, "open", PRESET, em=em, recall=recall, f1=f1)
