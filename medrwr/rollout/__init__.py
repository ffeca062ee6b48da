"""Rollout layer: the token-exact reason-query-retrieve loop, its backends, traces and CDIR."""

from medrwr.rollout.trace import RetrievalRecord, RolloutTrace, TokenSpan

__all__ = ["RetrievalRecord", "RolloutTrace", "TokenSpan"]
