"""The official MMMU response parsers (MMMU ``eval_utils.py``, as MedEvalKit's ``utils/MMMU`` carries them),
re-implemented: multiple-choice letter parsing with its seeded random fallback, open-answer parsing and matching."""

from __future__ import annotations

import random
import re

from medrwr.eval.record import EvalRecord, Verdict
from medrwr.eval.scoring._text import boxed_content, boxed_str, extract_tag

__all__ = ["eval_open", "judge_mmmu", "normalize_str", "parse_multi_choice", "parse_open"]


def _extract(response: str) -> str:
    if "<answer>" in response:
        response = extract_tag(response, "answer")
    return response


def parse_multi_choice(response: str, all_choices: list[str], index2ans: dict[str, str],
                       rng: random.Random) -> tuple[str, bool]:
    """(letter, guessed): "(X)" mentions, else " X " mentions, else option texts (answers over 5 words); the
    last-occurring candidate wins; none → a random letter from ``rng``."""
    response = "" if response is None else response
    if "<answer>" in response:
        response = _extract(response)
    elif "\\boxed" in response:
        got = boxed_content(response)
        response = "None" if got is None else got
    response = response.strip()
    for ch in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(ch)
    response = f" {response} "
    index_ans, with_brackets = True, False
    candidates = [c for c in all_choices if f"({c})" in response]
    if candidates:
        with_brackets = True
    else:
        candidates = [c for c in all_choices if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [k for k, ans in index2ans.items() if ans.lower() in response.lower()]
        index_ans = not candidates
    if not candidates:
        return rng.choice(all_choices), True
    if len(candidates) == 1:
        return candidates[0], False
    if index_ans:
        pattern = "({})" if with_brackets else " {} "
        starts = [response.rfind(pattern.format(c)) for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[max(range(len(starts)), key=lambda i: (starts[i], -i))], False


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(s: str) -> list[str | float]:
    s = s.strip()
    if _is_number(s):
        return [round(float(s.replace(",", "")), 2)]
    s = s.lower()
    return [" " + s, s + " "] if len(s) == 1 else [s]


_NUM_RES = [
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),
]


def parse_open(response: str) -> list[str | float]:
    """MMMU's ``parse_open_response``: key sub-responses after indicator words, plus every number, normalised."""
    text = response.strip().strip(".").lower()
    subs = re.split(r"\.\s(?=[A-Z])|\n", text)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys: list[str] = []
    for i, resp in enumerate(subs):
        if i == len(subs) - 1:
            indicators = indicators + ["="]
        shortest = None
        for ind in indicators:
            if ind in resp:
                tail = resp.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
            keys.append(shortest)
    if not keys:
        keys = [text]
    preds: list[str] = list(keys)
    for resp in keys:
        for rx in _NUM_RES:
            preds.extend(rx.findall(resp))
    out: list[str | float] = []
    for p in preds:
        for v in normalize_str(p):
            if v not in out:
                out.append(v)
    return out


def eval_open(gold: str | list[str], preds) -> bool:
    """MMMU's ``eval_open``: a gold string inside a predicted string, or a gold number equal to a predicted one.
    ``preds`` is iterated as given: a raw string (MedEvalKit's validation path) iterates its characters."""
    norm: list[str | float] = []
    for g in gold if isinstance(gold, list) else [gold]:
        norm.extend(normalize_str(str(g)))
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(a, str) and a in pred for a in norm):
                return True
        elif pred in norm:
            return True
    return False


def judge_mmmu(record: EvalRecord, response: str, *, rng: random.Random | None, preset: str) -> Verdict:
    """MedEvalKit's MMMU verdict: ``<answer>`` then ``\\boxed{}`` extraction, then the MMMU parsers."""
    if "<answer>" in response:
        response = _extract(response)
    if boxed_str(response) != "None":
        response = boxed_str(response)
    if record.answer_type == "mcq":
        assert record.options is not None
        letters = list(record.options)
        letter, guessed = parse_multi_choice(response, letters, dict(record.options),
                                             rng or random.Random(f"42:{record.id}"))
        return Verdict(letter == record.answer, letter, "mcq", preset, note="random_fallback" if guessed else None)
    gold = record.meta.get("gold_list") or record.answer
    if record.split == "validation":
        # MedEvalKit's validation path hands the raw response to eval_open, which iterates its characters
        return Verdict(eval_open(record.answer, response), response, "open", preset,
                       note="medevalkit validation open path (raw string)")
    preds = parse_open(response)
    return Verdict(eval_open(gold, preds), "; ".join(map(str, preds)), "open", preset)
