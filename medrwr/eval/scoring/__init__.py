"""Scoring: ``judge(record, response, preset) -> Verdict`` under the ``standard``, ``medevalkit`` and
``llava_med`` presets (docs/evaluation-scoring.md)."""

from medrwr.eval.scoring._text import extract_answer, open_metrics, yes_no
from medrwr.eval.scoring.presets import PRESETS, Preset, judge
from medrwr.eval.scoring.standard import extract_letter

__all__ = ["PRESETS", "Preset", "extract_answer", "extract_letter", "judge", "open_metrics", "yes_no"]
