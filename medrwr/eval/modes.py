"""The four evaluation modes as rollout settings and prompts (docs/evaluation.md, "Modes").

* ``direct``: no retrieval. ``rollout.max_rounds = 0`` and a system prompt without the search instructions. If
  the model still writes a ``<query>``, the engine's own rule applies: the first one is answered with the
  "Search budget spent ... Answer with the information you have" block (no retriever call), a second one ends
  the row (``stop_reason="max_rounds"``, scored wrong). Constrained decoding (``rollout.constrain: protocol``)
  never offers a query when no retrieval is left, so there the model can only answer.
* ``rag``: one retrieval with the question text (``Retriever.search``, one batched call per batch), the documents
  placed in the user message above the question, then the ``direct`` rules (no further retrieval).
* ``rwr``: the full reason-query-retrieve loop with the protocol's own system prompt (as in training).
* ``rwr_cdir``: ``rwr`` plus CDIR. Its trace keeps the first answer (``cdir.first``), which is exactly what ``rwr``
  answers on that item, so ``--mode all`` derives the ``rwr`` rows from the ``rwr_cdir`` run
  (:func:`rwr_view`) instead of running the loop twice.

Items without options (closed / open VQA) get the same prompts with the answer instruction asking for a short
phrase (or yes/no) instead of an option letter.
"""

from __future__ import annotations

import copy
from typing import Any

from medrwr import protocol
from medrwr.eval.record import EvalRecord

__all__ = ["MODES", "expand_modes", "question_text", "rwr_view", "system_for", "trace_for_storage"]

MODES: tuple[str, ...] = ("direct", "rag", "rwr", "rwr_cdir")
"""In the order ``--mode all`` runs them (``rwr`` comes from the ``rwr_cdir`` run when both are asked)."""

_OPEN_ANSWER = (
    "When you are ready, give your final answer inside <answer> </answer> tags: yes or no for a yes/no question, "
    "otherwise a short phrase, for example <answer>pneumonia</answer>."
)
_RAG_NOTE = "Reference documents retrieved for this question are given above it; use them where they help."


def expand_modes(mode: str | list[str] | tuple[str, ...]) -> list[str]:
    """``all`` or one mode or a list of modes → the modes to run, in :data:`MODES` order.

    >>> expand_modes("all"), expand_modes(["rwr", "direct"])
    (['direct', 'rag', 'rwr', 'rwr_cdir'], ['direct', 'rwr'])
    """
    names = [mode] if isinstance(mode, str) else list(mode)
    out: set[str] = set()
    for name in names:
        for part in str(name).split(","):
            part = part.strip()
            if part == "all":
                out.update(MODES)
            elif part in MODES:
                out.add(part)
            else:
                raise ValueError(f"unknown mode {part!r}; choose from {', '.join(MODES)} or all")
    if not out:
        raise ValueError(f"no mode given; choose from {', '.join(MODES)} or all")
    return [m for m in MODES if m in out]


def system_for(mode: str, record: EvalRecord) -> str | None:
    """The system prompt of ``mode`` for ``record`` (None = the protocol's own, used for MCQ in rwr modes)."""
    with_image = bool(record.images)
    mcq = record.answer_type == "mcq"
    if mode in ("rwr", "rwr_cdir") and mcq:
        return None
    lines = protocol.system_prompt(with_image=with_image).splitlines()
    out = []
    for line in lines:
        if mode in ("direct", "rag") and "<query>" in line:
            continue
        if not mcq and line.startswith("When you are ready"):
            line = _OPEN_ANSWER
        if not mcq:
            line = line.replace("a multiple-choice question", "a question")
        out.append(line)
    if mode == "rag":
        out.append(_RAG_NOTE)
    return "\n".join(out)


def question_text(record: EvalRecord, documents: list[str] | None = None) -> str:
    """The question as the user message holds it; ``rag`` puts the retrieved documents above it."""
    if not documents:
        return record.question
    return f"Reference documents:\n{protocol.numbered_documents(documents) or 'None'}\n\nQuestion: {record.question}"


_HEAVY = ("prompt_ids", "completion_ids", "completion_mask", "logprobs")


def trace_for_storage(trace: dict[str, Any], keep_tokens: bool = False) -> dict[str, Any]:
    """A trace dict without its per-token arrays (unless ``keep_tokens``): results stay small and readable.
    ``RolloutTrace.from_dict`` still reads it back (the arrays come back empty)."""
    if keep_tokens:
        return trace
    d = {k: v for k, v in trace.items() if k not in _HEAVY}
    d["prompt_ids"] = []
    d["metadata"] = dict(d.get("metadata") or {}, tokens_dropped=True)
    cdir = d.get("cdir")
    if isinstance(cdir, dict):
        for side in ("first", "second"):
            if isinstance(cdir.get(side), dict):
                cdir[side] = {k: v for k, v in cdir[side].items() if k not in ("dropped_ids", "dropped_logprobs")}
    return d


def rwr_view(trace: dict[str, Any]) -> dict[str, Any]:
    """The ``rwr`` trace contained in an ``rwr_cdir`` trace dict: the answer before CDIR's second look.

    Rows CDIR did not trigger on are returned as they are; on triggered rows the answer fields come from
    ``cdir.first`` and ``completion_text`` is the text before CDIR's insertion plus the dropped answer turn.
    """
    d = copy.deepcopy(trace)
    cdir = d.pop("cdir", None)
    d["cdir"] = None
    d["metadata"] = dict(d.get("metadata") or {}, derived_from="rwr_cdir")
    if not isinstance(cdir, dict) or not cdir.get("triggered") or not cdir.get("first"):
        return d
    first = cdir["first"]
    for key in ("answer", "choice", "confidence", "option_probs", "answer_position", "stop_reason"):
        d[key] = first.get(key)
    start = cdir.get("inserted_start")
    spans = d.get("spans") or []
    if start is not None and spans:
        before = "".join(s.get("text", "") for s in spans if s.get("end", 0) <= start)
        d["spans"] = [s for s in spans if s.get("end", 0) <= start]
    else:
        inserted = cdir.get("inserted_text") or ""
        text = d.get("completion_text") or ""
        cut = text.find(inserted[:40]) if inserted else -1
        before = text[:cut] if cut >= 0 else text
    d["completion_text"] = before + (first.get("dropped_text") or "")
    d["images"] = list(d.get("images") or [])[: max(0, len(d.get("images") or []) - len(cdir.get("cases") or []))]
    return d
