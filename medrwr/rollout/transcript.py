"""One row's token record: ids, mask, log-probabilities and spans, changed only through four operations.

The whole rollout rests on one invariant (docs/architecture.md, Decisions: token-in/token-out): the ids fed to a row's next turn
extend the ids fed to its previous turn plus the tokens generated there, exactly. :class:`Transcript` owns
everything that invariant touches, so the engine's loop and CDIR cannot break it from outside:

* :meth:`Transcript.append_model` -- one turn of model output (ids + log-probs, mask 1), split into spans;
* :meth:`Transcript.insert` / :meth:`Transcript.insert_after_turn` -- environment text, tokenised on its own
  (or given as ids), mask 0, log-prob 0.0;
* :meth:`Transcript.truncate` -- drop everything from a position on (CDIR drops the low-confidence answer);
  a deliberate edit, so the next turn must extend what is left;
* :meth:`Transcript.next_input` -- the exact ids to continue, after the prefix check that raises
  :class:`~medrwr.errors.RolloutDriftError` when something re-tokenised or edited the running sequence.

Text is decoded only to parse the model's output and to label spans, never to be encoded again.

:class:`Row` pairs a transcript with its :class:`~medrwr.rollout.trace.RolloutTrace` and the loop's state
(done, budget notices, where the answering turn starts); the engine and CDIR share it, and it changes the
trace's answer fields only through :meth:`Row.finish` and :meth:`Row.reopen`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medrwr import protocol
from medrwr.errors import RolloutDriftError
from medrwr.rollout.backends.base import MultimodalInputs
from medrwr.rollout.trace import RolloutTrace, SpanKind, TokenSpan

__all__ = ["ModelTurn", "Row", "TokenCodec", "Transcript"]


class TokenCodec:
    """A tokenizer's encode/decode with the settings the rollout needs, fixed in one place.

    Inserted text is encoded without special tokens; model text is decoded without special tokens and without
    clean-up, so decoded lengths are exact character offsets.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_end_at_char(self, ids: Sequence[int], char_end: int) -> int:
        """The smallest ``i`` with ``len(decode(ids[:i])) >= char_end``: tokens covering ``[0, char_end)``."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.decode(ids[:mid])) >= char_end:
                hi = mid
            else:
                lo = mid + 1
        return lo


@dataclass
class ModelTurn:
    """What one :meth:`Transcript.append_model` call added: ``[start, end)`` of the completion, its text and
    segments (parsed once, for the engine to read queries and the answer from)."""

    start: int
    end: int
    ids: list[int]
    text: str
    segments: list[protocol.Segment]


class Transcript:
    """The completion of one row (prompt ids, completion ids, mask, log-probs, spans, images).

    ``ids``, ``mask``, ``logprobs`` and ``spans`` are readable; change them only through the methods, which keep
    them the same length, keep the spans tiling the completion and keep the prefix check meaningful.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        codec: TokenCodec,
        *,
        mm: MultimodalInputs | None = None,
        name: str = "",
    ):
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.codec = codec
        self.mm = mm
        self.name = name
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.logprobs: list[float] = []
        self.spans: list[TokenSpan] = []
        self.turns = 0
        """Model turns appended so far."""
        self.model_tokens = 0
        """Model tokens in the completion now (what the token budgets count)."""
        self.generated_tokens = 0
        """Model tokens ever appended, truncated ones included."""
        self.inserted_tokens = 0
        """Environment tokens ever inserted."""
        self.turn_start = 0
        """Where the latest model turn starts; moved past each block inserted after it."""
        self._fed: list[int] | None = None
        self._expected: list[int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    # ------------------------------------------------------------------ reading

    def sequence(self) -> list[int]:
        """Prompt ids followed by the completion ids, nothing re-encoded."""
        return self.prompt_ids + self.ids

    def next_input(self) -> list[int]:
        """The exact ids to continue, checked to extend the previous turn's input plus its output."""
        ids = self.sequence()
        expected = self._expected
        if expected is not None:
            n = len(expected)
            if len(ids) < n or ids[:n] != expected:
                bad = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), n))
                raise RolloutDriftError(
                    f"row {self.name}: the ids fed to turn {self.turns + 1} do not extend the previous turn's ids "
                    f"(first difference at position {bad} of {n}: {ids[bad:bad + 5]} vs {expected[bad:bad + 5]}). "
                    "Something re-tokenised or edited the running sequence; this is a bug in the rollout code."
                )
        self._fed = ids
        return ids

    def text(self, start: int = 0, end: int | None = None) -> str:
        """The decoded completion tokens ``[start, end)`` (for display and parsing only)."""
        return self.codec.decode(self.ids[start:end])

    # ------------------------------------------------------------------ changing

    def _extend(self, ids: Sequence[int], mask: int, logprobs: Sequence[float] | None) -> int:
        start = len(self.ids)
        self.ids.extend(int(t) for t in ids)
        self.mask.extend([mask] * len(ids))
        self.logprobs.extend([float(x) for x in logprobs] if logprobs is not None else [0.0] * len(ids))
        return start

    def append_model(self, ids: Sequence[int], logprobs: Sequence[float]) -> ModelTurn:
        """Append one turn of model tokens (mask 1) with their log-probs and record its segment spans."""
        ids = [int(t) for t in ids]
        if len(logprobs) != len(ids):
            raise ValueError(f"{len(ids)} model tokens but {len(logprobs)} log-probabilities")
        self._expected = (self._fed or []) + ids
        start = self._extend(ids, 1, logprobs)
        self.turn_start = start
        self.turns += 1
        self.model_tokens += len(ids)
        self.generated_tokens += len(ids)
        if not ids:
            return ModelTurn(start, start, [], "", [])
        text = self.codec.decode(ids)
        segments = protocol.split_segments(text)
        self.spans.extend(self._model_spans(ids, segments, start))
        return ModelTurn(start, len(self.ids), ids, text, segments)

    def insert(self, kind: SpanKind, text: str, ids: Sequence[int] | None = None) -> TokenSpan:
        """Append environment text (tokenised on its own, or given as ``ids``) with mask 0; returns its span.

        The span's ``text`` is the decoding of its own tokens, so the span texts joined give the completion text.
        """
        ids = self.codec.encode(text) if ids is None else [int(t) for t in ids]
        start = self._extend(ids, 0, None)
        span = TokenSpan(kind, start, len(self.ids), by_model=False, text=self.codec.decode(ids))
        self.spans.append(span)
        self.inserted_tokens += len(ids)
        return span

    def insert_after_turn(self, kind: SpanKind, text: str, ids: Sequence[int] | None = None) -> TokenSpan:
        """:meth:`insert` after the latest model turn, on a new line when that turn did not end in whitespace."""
        turn = self.ids[self.turn_start :]
        turn_text = self.codec.decode(turn) if turn else ""
        if turn_text and not turn_text[-1].isspace():
            self.insert("text", "\n")
        span = self.insert(kind, text, ids)
        self.turn_start = len(self.ids)
        return span

    def add_images(self, mm: MultimodalInputs) -> None:
        """Images whose placeholder tokens were just inserted (CDIR's case image), after the row's own."""
        self.mm = mm if self.mm is None else self.mm.extended(mm)

    def truncate(self, cut: int) -> tuple[list[int], list[float]]:
        """Drop the completion from token ``cut`` on; returns the dropped ids and log-probs.

        Spans must not straddle ``cut`` (cut at a turn boundary). The drop is deliberate, so the next turn is
        checked against what is left.
        """
        if not 0 <= cut <= len(self.ids):
            raise ValueError(f"cannot truncate a {len(self.ids)}-token completion at {cut}")
        if any(s.start < cut < s.end for s in self.spans):
            raise ValueError(f"truncating at {cut} would split a span")
        dropped = (self.ids[cut:], self.logprobs[cut:])
        self.model_tokens -= sum(self.mask[cut:])
        del self.ids[cut:], self.mask[cut:], self.logprobs[cut:]
        self.spans = [s for s in self.spans if s.end <= cut]
        self.turn_start = min(self.turn_start, cut)
        self._expected = self.sequence()
        return dropped

    # ------------------------------------------------------------------ spans

    def _model_spans(self, ids: list[int], segments: list[protocol.Segment], offset: int) -> list[TokenSpan]:
        """Token spans of one turn's segments (boundaries by prefix decoding).

        A token straddling two segments (``">\\n"`` ends a block and holds the whitespace after it) belongs to
        the first segment it completes; segments left with no token of their own are dropped.
        """
        spans: list[TokenSpan] = []
        prev = 0
        for i, seg in enumerate(segments):
            end = len(ids) if i == len(segments) - 1 else self.codec.token_end_at_char(ids, seg.end)
            if end > prev:
                spans.append(TokenSpan(seg.kind, offset + prev, offset + end, True))  # type: ignore[arg-type]
                prev = end
        if prev < len(ids):  # trailing special tokens (eos) decode to nothing
            if spans:
                spans[-1].end = offset + len(ids)
            else:
                spans.append(TokenSpan("text", offset, offset + len(ids), True))
        for span in spans:
            span.text = self.codec.decode(ids[span.start - offset : span.end - offset])
        return spans


@dataclass
class Row:
    """The engine's state of one sample while it rolls out: its transcript, its trace, where the loop stands."""

    index: int
    request_id: str
    letters: str
    transcript: Transcript
    trace: RolloutTrace
    source_images: list[Any]
    done: bool = False
    budget_notices: int = 0
    answer_start: int | None = None
    """Where the turn holding the answer starts in the completion (CDIR cuts there)."""

    def finish(self, reason: str, error: str | None = None) -> None:
        self.done = True
        self.trace.stop_reason = reason  # type: ignore[assignment]
        if error and reason != "answer":
            self.trace.error = error

    def reopen(self) -> None:
        """Forget the answer so the row can answer again (CDIR cut its answering turn)."""
        tr = self.trace
        tr.answer = tr.confidence = tr.option_probs = tr.choice = tr.error = tr.answer_position = None
        tr.stop_reason = None
        self.done = False
        self.answer_start = None
