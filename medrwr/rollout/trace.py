"""RolloutTrace: the single record of one rollout, consumed by rewards, training, evaluation and serving.

Nobody re-parses strings to rebuild it: token ids, the per-token mask and the segment offsets are
tracked while the rollout runs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from medrwr.retrieval.base import Hit, ImageHit

SpanKind = Literal["think", "query", "retrieve", "answer", "text", "cdir"]
StopReason = Literal["answer", "eos", "max_rounds", "max_tokens", "no_progress", "error"]


@dataclass
class TokenSpan:
    """A span of ``completion_ids``: ``[start, end)`` token offsets, its kind and whether the model wrote it."""

    kind: SpanKind
    start: int
    end: int
    by_model: bool
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RetrievalRecord:
    """One retrieval step: the queries sent, the hits per query, the error if the retriever failed."""

    round: int
    queries: list[str]
    hits: list[list[Hit]]
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "queries": list(self.queries),
            "hits": [[h.to_dict() for h in hs] for hs in self.hits],
            "error": self.error,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RetrievalRecord":
        return cls(
            round=int(d["round"]),
            queries=list(d["queries"]),
            hits=[[Hit.from_dict(h) for h in hs] for hs in d["hits"]],
            error=d.get("error"),
            seconds=float(d.get("seconds", 0.0)),
        )


@dataclass
class RolloutTrace:
    """Everything about one rollout.

    ``completion_ids`` interleave model tokens and inserted (retrieval/CDIR) tokens;
    ``completion_mask[i]`` is 1 when the model produced token i and 0 when the environment inserted it.
    ``logprobs[i]`` is the sampling log-probability of model tokens and 0.0 for inserted ones.
    """

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    completion_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[TokenSpan] = field(default_factory=list)
    completion_text: str = ""
    queries: list[str] = field(default_factory=list)
    retrievals: list[RetrievalRecord] = field(default_factory=list)
    answer: str | None = None
    choice: str | None = None
    """The option letter extracted from ``answer`` (None for free-text answers)."""
    confidence: float | None = None
    """Probability of the answer's first non-whitespace token (METHOD.md §5)."""
    option_probs: dict[str, float] | None = None
    """Probabilities of each option letter at that position, renormalised over the options."""
    images: list[str] = field(default_factory=list)
    """Image inputs, as paths or ``data:`` URIs (the engine keeps the loaded objects separately)."""
    stop_reason: StopReason | None = None
    rounds: int = 0
    valid: bool = False
    error: str | None = None
    cdir: dict[str, Any] | None = None
    """When CDIR ran: first answer/confidence, the retrieved case, second answer/confidence."""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def hits(self) -> list[Hit]:
        """Every retrieved hit in order."""
        return [h for r in self.retrievals for hs in r.hits for h in hs]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spans"] = [s.to_dict() for s in self.spans]
        d["retrievals"] = [r.to_dict() for r in self.retrievals]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RolloutTrace":
        d = dict(d)
        d["spans"] = [TokenSpan(**s) for s in d.get("spans", [])]
        d["retrievals"] = [RetrievalRecord.from_dict(r) for r in d.get("retrievals", [])]
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "RolloutTrace":
        return cls.from_dict(json.loads(text))
