"""RolloutTrace: the single record of one rollout, consumed by rewards, training, evaluation and serving.

Nobody re-parses strings to rebuild it: token ids, the per-token mask and the segment offsets are
tracked while the rollout runs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from medrwr.retrieval.base import Hit, ImageHit

SpanKind = Literal["think", "query", "retrieve", "answer", "text", "cdir"]
StopReason = Literal["answer", "eos", "max_rounds", "max_tokens", "no_progress", "error"]
"""Why a rollout ended: ``answer`` (a closed answer block), ``eos`` (end of sequence without one),
``max_rounds`` (a query after the search budget was spent and announced), ``max_tokens`` (a token budget),
``no_progress`` (an empty turn), ``error`` (a model mistake such as an empty or malformed query; ``error``
says which)."""


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenSpan:
        return cls(
            kind=d["kind"], start=int(d["start"]), end=int(d["end"]), by_model=bool(d["by_model"]),
            text=str(d.get("text", "")),
        )


@dataclass
class RetrievalRecord:
    """One retrieval step: the queries sent, the hits per query, the error if the retriever failed."""

    round: int
    queries: list[str]
    hits: list[list[Hit]]
    error: str | None = None
    seconds: float = 0.0
    inserted_tokens: list[int] = field(default_factory=list)
    """Tokens of the retrieve block inserted for each query (after truncation)."""
    truncated: bool = False
    """True when documents were cut to fit ``rollout.max_inserted_tokens``."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "queries": list(self.queries),
            "hits": [[h.to_dict() for h in hs] for hs in self.hits],
            "error": self.error,
            "seconds": self.seconds,
            "inserted_tokens": list(self.inserted_tokens),
            "truncated": self.truncated,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetrievalRecord:
        return cls(
            round=int(d["round"]),
            queries=list(d["queries"]),
            hits=[[Hit.from_dict(h) for h in hs] for hs in d["hits"]],
            error=d.get("error"),
            seconds=float(d.get("seconds", 0.0)),
            inserted_tokens=[int(x) for x in d.get("inserted_tokens", [])],
            truncated=bool(d.get("truncated", False)),
        )


@dataclass
class CDIRAnswer:
    """One answer of a CDIR row (docs/method.md §5): what the trace said before (``first``) or after (``second``) the
    consultation. ``dropped_*`` hold the first answer's turn, cut from the completion to make room."""

    answer: str | None = None
    choice: str | None = None
    confidence: float | None = None
    option_probs: dict[str, float] | None = None
    answer_position: int | None = None
    """Completion index of the confidence token (for ``first``: in the completion before the cut)."""
    stop_reason: StopReason | None = None
    dropped_ids: list[int] = field(default_factory=list)
    dropped_logprobs: list[float] = field(default_factory=list)
    dropped_text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CDIRAnswer:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class CDIRRecord:
    """What CDIR decided for one row and, when it ran, both answers and the consulted case(s).

    ``confidence`` is the one compared with ``threshold``; ``reason`` says why CDIR did or did not run; ``error``
    is set when it should have run but could not (image index down, case image unreadable) -- the first answer
    then stands. ``[inserted_start, inserted_end)`` are the completion tokens CDIR inserted.
    """

    triggered: bool = False
    threshold: float = 0.0
    confidence: float | None = None
    reason: str = ""
    error: str | None = None
    first: CDIRAnswer | None = None
    second: CDIRAnswer | None = None
    cases: list[ImageHit] = field(default_factory=list)
    inserted_start: int | None = None
    inserted_end: int | None = None
    inserted_text: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["first"] = self.first.to_dict() if self.first else None
        d["second"] = self.second.to_dict() if self.second else None
        d["cases"] = [h.to_dict() for h in self.cases]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CDIRRecord:
        d = dict(d)
        first, second = d.pop("first", None), d.pop("second", None)
        cases = [ImageHit.from_dict(h) for h in d.pop("cases", None) or []]
        known = {f.name for f in fields(cls)}
        return cls(
            first=CDIRAnswer.from_dict(first) if first else None,
            second=CDIRAnswer.from_dict(second) if second else None,
            cases=cases,
            **{k: v for k, v in d.items() if k in known},
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
    """Probability of the answer's first non-whitespace token (docs/method.md §1, §5)."""
    option_probs: dict[str, float] | None = None
    """Probabilities of each option letter at that position, renormalised over the options."""
    answer_position: int | None = None
    """Index in ``completion_ids`` of the token ``confidence`` and ``option_probs`` were read at (None when the
    answer names no choice). Rewards read σc's "with retrieval" side here instead of re-parsing the text."""
    first_pass_option_probs: dict[str, float] | None = None
    """``option_probs`` of the answer written in the rollout's first generation pass (its first turn), before any
    retrieval; None when that pass stopped at a query. Compat σc's "without retrieval" side (docs/method.md §2): as
    in the reference code, a rollout that searched has no first-pass answer."""
    images: list[str] = field(default_factory=list)
    """Image inputs in placeholder order, as paths (or a short description of an in-memory image); CDIR
    appends the consulted case's image. The engine keeps the loaded objects separately."""
    stop_reason: StopReason | None = None
    rounds: int = 0
    valid: bool = False
    error: str | None = None
    cdir: CDIRRecord | None = None
    """When CDIR was enabled: whether it ran, both answers and confidences, the consulted case."""
    constrained: str | None = None
    """The grammar decoding was constrained to (``"protocol"``, ``rollout.constrain``), None when free. Then
    ``metadata["constrained_logprobs"]`` says whether ``logprobs`` are the model's own (``"raw"``) or taken after
    the grammar mask (``"masked"``)."""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def hits(self) -> list[Hit]:
        """Every retrieved hit in order."""
        return [h for r in self.retrievals for hs in r.hits for h in hs]

    @property
    def segments(self) -> list[TokenSpan]:
        """The spans, by kind and token offsets."""
        return self.spans

    @property
    def num_model_tokens(self) -> int:
        return sum(self.completion_mask)

    @property
    def num_inserted_tokens(self) -> int:
        return len(self.completion_mask) - sum(self.completion_mask)

    def model_token_ids(self) -> list[int]:
        """The completion ids the model produced (mask 1), in order."""
        return [t for t, m in zip(self.completion_ids, self.completion_mask) if m]

    def inserted_token_ids(self) -> list[int]:
        """The completion ids the environment inserted (mask 0), in order."""
        return [t for t, m in zip(self.completion_ids, self.completion_mask) if not m]

    def check(self) -> None:
        """Raise ValueError when the per-token arrays or spans are inconsistent (a bug, not a model mistake)."""
        n = len(self.completion_ids)
        if len(self.completion_mask) != n or len(self.logprobs) != n:
            raise ValueError(
                f"completion_ids ({n}), completion_mask ({len(self.completion_mask)}) and logprobs "
                f"({len(self.logprobs)}) must have the same length"
            )
        pos = 0
        for s in sorted(self.spans, key=lambda s: s.start):
            if s.start != pos or s.end < s.start:
                raise ValueError(f"spans must tile the completion: {s.kind} span starts at {s.start}, expected {pos}")
            if any(self.completion_mask[i] != int(s.by_model) for i in range(s.start, s.end)):
                raise ValueError(f"{s.kind} span [{s.start}, {s.end}) disagrees with completion_mask")
            pos = s.end
        if pos != n:
            raise ValueError(f"spans cover {pos} of {n} completion tokens")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spans"] = [s.to_dict() for s in self.spans]
        d["retrievals"] = [r.to_dict() for r in self.retrievals]
        d["cdir"] = self.cdir.to_dict() if self.cdir is not None else None
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutTrace:
        """Inverse of :meth:`to_dict`; unknown keys (from a newer version) are kept in ``metadata``."""
        d = dict(d)
        d["spans"] = [TokenSpan.from_dict(s) for s in d.get("spans", [])]
        d["retrievals"] = [RetrievalRecord.from_dict(r) for r in d.get("retrievals", [])]
        if isinstance(d.get("cdir"), dict):
            d["cdir"] = CDIRRecord.from_dict(d["cdir"])
        known = {f.name for f in fields(cls)}
        extra = {k: d.pop(k) for k in list(d) if k not in known}
        if extra:
            d["metadata"] = {**dict(d.get("metadata") or {}), "_unknown_fields": extra}
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> RolloutTrace:
        return cls.from_dict(json.loads(text))


_STYLES = {"think": "cyan", "query": "bold yellow", "retrieve": "green", "answer": "bold magenta", "text": "dim"}


def render_trace(trace: RolloutTrace, max_chars: int = 1200) -> Any:
    """A rich renderable of a trace: each span in order (think / query / retrieved / answer), then the verdict."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    for span in trace.spans:
        text = span.text.strip()
        if not text:
            continue
        if len(text) > max_chars:
            text = text[:max_chars] + " …"
        who = "model" if span.by_model else "inserted"
        parts.append(
            Panel(Text(text), title=f"{span.kind} ({who}, tokens {span.start}-{span.end})",
                  title_align="left", border_style=_STYLES.get(span.kind, "white"))
        )
    summary = Table.grid(padding=(0, 2))
    summary.add_row("answer", repr(trace.answer))
    summary.add_row("choice", str(trace.choice))
    summary.add_row("confidence", "—" if trace.confidence is None else f"{trace.confidence:.4f}")
    if trace.option_probs:
        summary.add_row("options", "  ".join(f"{k}: {v:.3f}" for k, v in trace.option_probs.items()))
    summary.add_row("stop", f"{trace.stop_reason}" + (f" ({trace.error})" if trace.error else ""))
    summary.add_row("retrievals", str(trace.rounds))
    summary.add_row("valid", str(trace.valid))
    if trace.constrained:
        lp = trace.metadata.get("constrained_logprobs")
        summary.add_row(
            "decoding", f"constrained to the {trace.constrained} grammar" + (f" (log-probs: {lp})" if lp else "")
        )
    summary.add_row(
        "tokens", f"{len(trace.prompt_ids)} prompt, {trace.num_model_tokens} model, {trace.num_inserted_tokens} inserted"
    )
    if trace.cdir:
        c = trace.cdir
        if c.triggered:
            first, second = c.first or CDIRAnswer(), c.second or CDIRAnswer()
            summary.add_row(
                "CDIR",
                f"first {first.choice} ({first.confidence or 0:.3f}) -> "
                f"second {second.choice} ({second.confidence or 0:.3f})",
            )
        else:
            why = c.error or c.reason
            if not c.error and c.confidence is not None and c.threshold is not None and c.confidence >= c.threshold:
                why = f"confidence {c.confidence:.3f} >= threshold {c.threshold:.2f}"
            elif not c.error and c.reason == "the question has no image":
                why = "no image was given (pass --image)"
            summary.add_row("CDIR", f"not triggered: {why}")
    parts.append(Panel(summary, title="result", title_align="left"))
    return Group(*parts)
