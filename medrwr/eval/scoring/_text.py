"""Text helpers every preset shares: where the answer is in a response, normalisation, tokens and the open-answer
metrics (EM, token recall, token F1)."""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections import Counter

from medrwr.protocol import normalize_text

__all__ = [
    "boxed_content",
    "boxed_str",
    "extract_tag",
    "most_similar_index",
    "extract_answer",
    "norm_closed",
    "open_metrics",
    "strip_reasoning",
    "tokens",
    "yes_no",
]

_SPAN_RES = [
    re.compile(rf"<{tag}>.*?(?:</{tag}>|(?=<answer>)|$)", re.DOTALL | re.IGNORECASE)
    for tag in ("think", "retrieve", "query")
]
_ANSWER_RE = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)


def strip_reasoning(text: str) -> str:
    """The response without ``<think>``, ``<retrieve>`` and ``<query>`` spans (an unclosed one runs to
    ``<answer>`` or the end)."""
    for rx in _SPAN_RES:
        text = rx.sub(" ", text)
    return text


def boxed_content(text: str) -> str | None:
    r"""The brace-matched content of the *last* ``\boxed{`` (as mathruler's ``extract_boxed_content``), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    content = text[start + len("\\boxed{") :]
    depth = 0
    for i, ch in enumerate(content):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                return content[:i].strip()
    return None


def extract_answer(response: str | None) -> tuple[str, str]:
    r"""(answer text, where it came from) by the standard order: the last ``<answer>`` block (a ``\boxed{}``
    inside it wins), else the last ``\boxed{}``, else the whole text; think/retrieve/query spans stripped first.

    >>> extract_answer("<think>maybe A</think><answer>B</answer>")
    ('B', 'answer')
    >>> extract_answer("so \\boxed{C}"), extract_answer(" yes ")
    (('C', 'boxed'), ('yes', 'text'))
    """
    text = strip_reasoning(response or "")
    blocks = _ANSWER_RE.findall(text)
    if blocks:
        inner = blocks[-1]
        boxed = boxed_content(inner)
        return (boxed if boxed is not None else inner.strip()), "answer"
    boxed = boxed_content(text)
    if boxed is not None:
        return boxed, "boxed"
    return text.strip(), "text"


def boxed_str(text: str) -> str:
    """mathruler's return convention: the boxed content, or the string ``"None"`` (MedEvalKit tests for it)."""
    got = boxed_content(text)
    return "None" if got is None else got


def extract_tag(text: str | None, tag: str, hard: bool = True) -> str:
    """MedEvalKit's ``extract``: every closed ``<tag>…</tag>`` joined by spaces; none → the text (hard) or ``""``."""
    if not text:
        return ""
    start_tag, end_tag = f"<{tag}>", f"</{tag}>"
    parts = []
    start = text.find(start_tag)
    while start != -1:
        end = text.find(end_tag, start + len(start_tag))
        if end == -1:
            break
        parts.append(text[start + len(start_tag) : end] + " ")
        start = text.find(start_tag, end + len(end_tag))
    joined = "".join(parts).strip()
    if joined:
        return joined
    return text if hard else ""


def most_similar_index(choices: list[str], target: str) -> int:
    """Index of the choice with the highest ``difflib`` ratio to ``target``; the first maximum wins, 0 if all 0."""
    best, best_ratio = 0, 0.0
    for i, choice in enumerate(choices):
        ratio = difflib.SequenceMatcher(None, choice, target).ratio()
        if ratio > best_ratio:
            best, best_ratio = i, ratio
    return best



# --- normalisation -------------------------------------------------------------------------------------

_PAREN_RE = re.compile(r"\([^()]*\)|（[^（）]*）")
_CJK_PUNCT = "，。、；：？！「」『』（）《》【】“”‘’…—·"
_PUNCT_RE = re.compile(rf"[^\w\s]|[{_CJK_PUNCT}]|_")
_XRAY_RE = re.compile(r"\bx\s*ray\b")
_CJK_RE = re.compile(r"([\u3400-\u9fff\uf900-\ufaff])")


def norm_closed(text: str | None) -> str:
    """lmms-eval's SLAKE normalisation plus ours: NFKC, lower-case, parenthesised spans dropped, punctuation (ASCII
    and Chinese) to spaces, ``x ray``/``x-ray`` → ``xray``, articles dropped, whitespace collapsed."""
    t = unicodedata.normalize("NFKC", str(text or "")).lower()
    t = _PAREN_RE.sub(" ", t)
    t = _PUNCT_RE.sub(" ", t)
    t = _XRAY_RE.sub("xray", " ".join(t.split()))
    return " ".join(w for w in t.split() if w not in ("a", "an", "the"))


def tokens(text: str | None) -> list[str]:
    """Normalised tokens; Chinese characters count one token each."""
    return _CJK_RE.sub(r" \1 ", norm_closed(text)).split()


def open_metrics(gold: str, pred: str) -> tuple[float, float, float]:
    """(EM, token recall, token F1) of a prediction against one gold answer, all in [0, 1].

    EM compares normalised strings; recall is the share of gold token types found in the prediction (LLaVA-Med's
    convention); F1 is SQuAD's bag-of-tokens F1.

    >>> open_metrics("right upper lobe", "The right upper lobe.")
    (1.0, 1.0, 1.0)
    >>> open_metrics("right upper lobe", "upper lobe")[1:]
    (0.6666666666666666, 0.8)
    """
    g, p = tokens(gold), tokens(pred)
    em = float(bool(g) and g == p)
    if not g or not p:
        return em, 0.0, 0.0
    recall = len(set(g) & set(p)) / len(set(g))
    common = sum((Counter(g) & Counter(p)).values())
    if common == 0:
        return em, recall, 0.0
    prec, rec = common / len(p), common / len(g)
    return em, recall, 2 * prec * rec / (prec + rec)


# --- yes / no ------------------------------------------------------------------------------------------

_YES = {"yes", "y", "yeah", "yep", "true", "correct", "present", "是", "有", "对", "是的", "正确"}
_NO = {"no", "n", "nope", "false", "incorrect", "absent", "否", "无", "没有", "不是", "不", "错误", "不对"}
_ZH_PREFIX = [("不是", "no"), ("没有", "no"), ("不对", "no"), ("错误", "no"), ("不", "no"), ("否", "no"),
              ("无", "no"), ("是", "yes"), ("有", "yes"), ("对", "yes"), ("正确", "yes")]


def yes_no(text: str | None) -> str | None:
    """``"yes"``/``"no"`` when the whole answer or its first token is a yes/no word (English or Chinese), else
    None: never a bare substring, so "normal", "not sure" and "nodule" are not "no".

    >>> yes_no("Yes, there is an effusion."), yes_no("No."), yes_no("normal"), yes_no("没有")
    ('yes', 'no', None, 'no')
    """
    norm = " ".join(_PUNCT_RE.sub(" ", unicodedata.normalize("NFKC", str(text or "")).lower()).split())
    if not norm:
        return None
    if norm in _YES:
        return "yes"
    if norm in _NO:
        return "no"
    first = norm.split()[0]
    if first in _YES:
        return "yes"
    if first in _NO:
        return "no"
    if _CJK_RE.match(first):
        for prefix, value in _ZH_PREFIX:
            if first.startswith(prefix):
                return value
    return None


def normalize_option(text: str) -> str:
    """An option's text for matching against an answer (protocol's SQuAD-style normalisation)."""
    return normalize_text(text)
