"""medrwr.eval layer (planned; see docs/architecture.md)."""

from medrwr.eval.record import EvalRecord, Verdict

__all__ = ["EvalRecord", "Verdict"]
