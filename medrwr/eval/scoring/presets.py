"""The scoring presets and :func:`judge`, the one entry point the runner calls per item."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from medrwr.eval.record import EvalRecord, Verdict

__all__ = ["PRESETS", "Preset", "judge", "llm_judged"]


@dataclass(frozen=True)
class Preset:
    """A scoring convention. ``open_metric`` is the Verdict field a report averages over open items (``em`` or
    ``recall``); ``data`` holds the loader settings the convention implies per benchmark (``split``,
    ``languages``), which the runner applies unless the user set them."""

    name: str
    description: str
    open_metric: str = "em"
    data: dict[str, dict[str, Any]] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "standard": Preset(
        "standard",
        "MedRwR protocol (BENCHMARKS.md §9): answer block > \\boxed{} > text; MCQ letters with an unparsed "
        "bucket counted wrong; yes/no by first token; closed by normalised EM; open EM/recall/F1.",
    ),
    "medevalkit": Preset(
        "medevalkit",
        "MedEvalKit HEAD 9b12e3b verdicts: similarity fallback for MCQ, yes/no-defined closed for VQA-RAD and "
        "PathVQA, SLAKE en+zh, PMC-VQA test_2, MMMU parse with seeded random fallback (crashes and mis-ordered "
        "metric fields not copied; see docs/evaluation-scoring.md).",
        data={"slake": {"languages": None}, "pmc_vqa": {"split": "test_2"}, "mmmu": {"split": "validation"}},
    ),
    "llava_med": Preset(
        "llava_med",
        "LLaVA-Med convention: SLAKE English; closed = answer_type CLOSED, gold substring of the answer; open "
        "scored by token recall.",
        open_metric="recall",
        data={"slake": {"languages": ["en"]}},
    ),
}


def llm_judged(record: EvalRecord) -> bool:
    """Whether an LLM judge, when given, decides this item: open and non-yes/no closed answers."""
    return record.answer_type != "mcq" and not record.is_yes_no


def judge(record: EvalRecord, response: str | None, preset: str = "standard", *,
          fallback: str | None = None, rng: random.Random | None = None, llm_judge: Any = None) -> Verdict:
    """Score ``response`` to ``record`` under ``preset`` (a name in :data:`PRESETS`).

    ``fallback`` (standard preset, MCQ): ``"similarity"`` or ``"random"`` guess a letter where none was found.
    ``rng``: the random source for MMMU's random fallback (medevalkit; pass one ``random.Random(42)`` and judge
    items in dataset order to reproduce MedEvalKit's run exactly); by default each item draws from its own
    ``Random("42:<id>")``, which does not depend on order. ``llm_judge`` (a
    :class:`~medrwr.eval.judge_llm.LLMJudge`): decides ``correct`` for open and non-yes/no closed answers.

    >>> from medrwr.eval.record import EvalRecord
    >>> r = EvalRecord(id="1", benchmark="slake", split="test", question="Is it normal?", answer="No",
    ...                answer_type="closed", is_yes_no=True)
    >>> judge(r, "normal").correct, judge(r, "normal", "medevalkit").correct
    (False, False)
    >>> judge(r, "<answer>No.</answer>").correct
    True
    """
    if preset == "standard":
        from medrwr.eval.scoring.standard import judge_standard

        verdict = judge_standard(record, response, fallback=fallback, rng=rng)
    elif preset == "medevalkit":
        from medrwr.eval.scoring.medevalkit import judge_medevalkit

        verdict = judge_medevalkit(record, response, rng=rng)
    elif preset == "llava_med":
        from medrwr.eval.scoring.llava_med import judge_llava_med

        verdict = judge_llava_med(record, response)
    else:
        raise ValueError(f"unknown scoring preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if llm_judge is not None and llm_judged(record):
        verdict = llm_judge.apply(record, response, verdict)
    return verdict
