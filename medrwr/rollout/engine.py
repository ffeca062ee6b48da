"""The reason-query-retrieve loop, token-in/token-out (docs/method.md §1, docs/architecture.md).

Long module: the loop plus its optional serving hooks (events, cancellation), which must see every step.

One :class:`RolloutEngine.run` call drives a batch of samples:

1. render each prompt with the backend's chat template (token ids + images) into a :class:`Transcript`;
2. generate every unfinished row until ``</query>``, ``</answer>``, end-of-sequence or its token budget;
3. parse the decoded text of *this turn's model tokens* (decoding for parsing only; the running completion is
   never re-encoded) for queries and the answer;
4. send the queries of every row paused at a query in ONE batched ``Retriever.search`` call;
5. tokenise each retrieve block on its own and insert its ids with mask 0; continue;
6. when CDIR is on, re-answer the low-confidence rows (:mod:`medrwr.rollout.cdir`, through
   :meth:`~medrwr.rollout.transcript.Row.reopen` and :meth:`RolloutEngine.continue_rows`).

Rows change only through their :class:`~medrwr.rollout.transcript.Transcript`, whose prefix check raises
:class:`RolloutDriftError` when a turn's input does not extend the previous turn's exactly (our bug). Model
mistakes (an empty query, a missing closing tag, a spent budget) end the row with a ``stop_reason``/``error``
on its trace, never an exception; a failing retriever inserts an explicit "retrieval failed" block and the
rollout continues.

Decisions (documented in one place):

* The retrieve block is ``protocol.format_retrieval(docs)``; when the model's turn does not end in whitespace a
  ``"\\n"`` is put in front, so the decoded completion reads ``</query>\\n<retrieve>...``. One block per query,
  in query order. Generation pauses at the first ``</query>``, so a turn normally has one query; if a turn
  holds several closed query blocks, each (up to ``queries_per_turn``) is retrieved.
* ``max_rounds`` counts retrieval steps. A query after the last allowed step gets a retrieve block saying
  the search budget is spent (no retriever call, no :class:`RetrievalRecord`) so the model can still answer;
  a second one ends the row with ``stop_reason="max_rounds"``.
* Token budgets count the model tokens in the completion: per turn ``max_new_tokens_per_turn``, in total
  ``max_total_new_tokens``. Inserted tokens don't count; each retrieve block is capped at
  ``max_inserted_tokens`` by truncating documents (by tokens), never the tags.
* ``constrain="protocol"`` (``rollout.constrain``; :mod:`medrwr.rollout.constrain`) hands the backend one turn
  grammar per row: think, then query or answer (answer only once ``max_rounds`` retrievals are spent), answer
  letters limited to the row's options, texts bounded to fit the turn's budget. The trace records it
  (``constrained``, ``metadata["constrained_logprobs"]``). ``auto`` is resolved by the caller
  (:func:`medrwr.rollout.constrain.resolve_constrain`); a bare ``auto`` here means free decoding.
* Confidence is the probability of the token holding the answer's first character that is not whitespace or
  an opening bracket/quote/``*`` (so ``(B)`` and ``**B**`` read the letter), from the generation log-probs; the
  option distribution sums each letter's single-token variants (``B``, ``b``, `` B``, ``>B``, ``(B``...) at
  that position and renormalises over the sample's options. The trace keeps that token's index
  (``answer_position``) and, when the first turn answered, its distribution (``first_pass_option_probs``).
* Serving hooks (optional; nothing changes without them): ``run(..., on_event=fn)`` reports
  :class:`RolloutEvent` s as the loop goes (``tokens`` per generated token when the backend has
  ``supports_token_callback``, ``query``, ``retrieval``, ``cdir``, ``finish``); ``cancelled=fn(request_id)``
  ends a row whose client went away (``stop_reason="error"``, ``error="cancelled: ..."``) and stops its generation.
  ``admit=fn()`` is continuous batching at turn boundaries: before every turn it returns more requests, which
  join the running batch (their traces follow the given ones in the result). Without CDIR each row is finalised
  and its ``finish`` event sent as soon as it is done, so a server can answer it while the batch goes on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from medrwr import protocol
from medrwr.config import CDIRConfig, RolloutConfig
from medrwr.errors import ConstraintError, RolloutDriftError
from medrwr.retrieval.base import Hit, ImageRetriever, Retriever
from medrwr.rollout.backends.base import (
    BackendError,
    Continuation,
    GenerationState,
    PolicyBackend,
    PromptInputs,
)
from medrwr.rollout.cdir import run_cdir
from medrwr.rollout.request import RolloutRequest, image_ref, images_in, load_image
from medrwr.rollout.retrieval_step import fit_retrieval_block, search_batch
from medrwr.rollout.trace import RetrievalRecord, RolloutTrace
from medrwr.rollout.transcript import ModelTurn, Row, TokenCodec, Transcript

logger = logging.getLogger(__name__)

__all__ = [
    "EngineStats",
    "RolloutEvent",
    "RolloutDriftError",
    "RolloutEngine",
    "RolloutRequest",
    "Row",
    "engine_from_config",
    "load_image",
]


@dataclass
class EngineStats:
    """Wall time split, for the benchmark: engine overhead = total - generate - retrieval."""

    generate_s: float = 0.0
    retrieval_s: float = 0.0
    total_s: float = 0.0
    generate_calls: int = 0
    retrieval_calls: int = 0
    model_tokens: int = 0
    inserted_tokens: int = 0

    @property
    def overhead_s(self) -> float:
        return max(0.0, self.total_s - self.generate_s - self.retrieval_s)

    def to_dict(self) -> dict[str, float]:
        d = dict(self.__dict__)
        d["overhead_s"] = self.overhead_s
        return d


@dataclass
class RolloutEvent:
    """One step of a row, for streaming (``run(on_event=...)``): ``kind`` is ``tokens`` (``data["ids"]``: model
    tokens just generated), ``query`` (``round``, ``queries``), ``retrieval`` (``record``: a RetrievalRecord),
    ``cdir`` (``record``: the row's CDIRRecord, once CDIR is over) or ``finish`` (``trace``)."""

    kind: str
    index: int
    request_id: str
    data: dict[str, Any]


EventFn = Callable[[RolloutEvent], None]
CANCELLED = "cancelled: the client went away"


class RolloutEngine:
    """Runs batches of samples through the reason-query-retrieve loop on any :class:`PolicyBackend`.

    ``retriever`` may be None: a query then gets a "retrieval failed: no retriever configured" block.
    ``image_retriever`` + ``cdir`` (enabled) turn on CDIR after the answer (see :mod:`medrwr.rollout.cdir`).
    """

    def __init__(
        self,
        backend: PolicyBackend,
        retriever: Retriever | None = None,
        config: RolloutConfig | None = None,
        *,
        k: int = 3,
        search_mode: str | None = None,
        image_retriever: ImageRetriever | None = None,
        cdir: CDIRConfig | None = None,
        with_image: bool | None = None,
        constrain: str | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.codec = TokenCodec(backend.tokenizer)
        self.retriever = retriever
        self.config = config or RolloutConfig()
        if k < 1:
            raise ValueError(f"k (documents per query) must be >= 1, got {k}")
        self.k = k
        self.search_mode = search_mode
        self.image_retriever = image_retriever
        self.cdir = cdir or CDIRConfig()
        self.with_image = with_image
        self.clock = clock
        self.stats = EngineStats()
        # Single-token spellings of each option letter: ``B``, ``b``, `` B``, ``>B``, ``(B``... (whichever exist).
        self._watch_letter = protocol.letter_token_ids(self.codec.encode)
        self._watch_ids = list(self._watch_letter)
        mode = constrain if constrain is not None else self.config.constrain
        self.constrain: str | None = None if mode in ("none", "auto") else mode
        if self.constrain not in (None, "protocol"):
            raise ConstraintError(f"unknown constraint {mode!r} (rollout.constrain); choose none or protocol")
        if self.constrain and not getattr(backend, "supports_constraints", False):
            raise ConstraintError(
                f"the {type(backend).__name__} backend cannot constrain decoding; set rollout.constrain: none"
            )
        self._options: dict[int, dict[str, str]] = {}
        self._on_event: EventFn | None = None
        self._cancelled: Callable[[str], bool] | None = None
        self._finalized: set[int] = set()
        self._finish_early = False

    # ------------------------------------------------------------------ preparing prompts

    def _messages_for(self, req: RolloutRequest, images: list[Any]) -> list[dict[str, Any]]:
        with_image = self.with_image if self.with_image is not None else bool(images)
        system = req.system if req.system is not None else protocol.system_prompt(with_image=with_image)
        text = protocol.format_question(req.question, req.options)
        if images:
            content: Any = [{"type": "image", "image": img} for img in images] + [{"type": "text", "text": text}]
        else:
            content = text
        return [{"role": "system", "content": system}, {"role": "user", "content": content}]

    def _prepare(self, req: RolloutRequest, index: int) -> Row:
        if req.messages is not None:
            messages = req.messages
            images = images_in(messages)
        else:
            images = [load_image(img, self.config.max_image_pixels) for img in req.images]
            messages = self._messages_for(req, images)
        if images and not self.backend.supports_images:
            raise BackendError(
                "this policy is text-only but the question has images: pass a vision-language model "
                "(e.g. --model Qwen/Qwen2.5-VL-7B-Instruct or a local Qwen2.5-VL folder)"
            )
        prompt: PromptInputs = self.backend.prepare_prompt(messages, images)
        rid = req.request_id if req.request_id is not None else str(index)
        refs = [image_ref(img) for img in (req.images if req.messages is None else images)]
        trace = RolloutTrace(prompt_ids=list(prompt.prompt_ids), images=refs, metadata=dict(req.metadata))
        trace.metadata.setdefault("request_id", rid)
        transcript = Transcript(prompt.prompt_ids, self.codec, mm=prompt.mm, name=rid)
        row = Row(index, rid, req.option_letters(), transcript, trace, list(images))
        if self.constrain:
            trace.constrained = self.constrain
            trace.metadata["constrained_logprobs"] = getattr(self.backend, "constrained_logprobs", "raw")
            if req.messages is None and req.options:
                items = req.options.items() if isinstance(req.options, dict) else zip(protocol.OPTION_LETTERS,
                                                                                      req.options)
                self._options[id(row)] = {str(k): str(v) for k, v in items}
        return row

    # ------------------------------------------------------------------ public API

    def run(
        self,
        requests: Sequence[RolloutRequest],
        *,
        on_event: EventFn | None = None,
        cancelled: Callable[[str], bool] | None = None,
        admit: Callable[[], Sequence[RolloutRequest]] | None = None,
    ) -> list[RolloutTrace]:
        """Roll out every request; returns one trace per request, in order (admitted requests last).

        ``on_event`` receives :class:`RolloutEvent` s while the loop runs; ``cancelled(request_id)`` True ends
        that row early; ``admit()`` adds requests at turn boundaries (all for serving; see the module docstring)."""
        t0 = self.clock()
        self._options.clear()
        self._finalized.clear()
        self._on_event, self._cancelled = on_event, cancelled
        cdir = self.cdir.enabled and self.image_retriever is not None
        self._finish_early = not cdir
        try:
            rows = [self._prepare(r, i) for i, r in enumerate(requests)]
            self.continue_rows(rows, admit=admit)
            self._finish_early = False
            if cdir:
                run_cdir(self, [r for r in rows if not self._is_cancelled(r)])
                for row in rows:
                    if row.trace.cdir is not None and row.trace.cdir.triggered:
                        self._emit("cdir", row, record=row.trace.cdir)
            for row in rows:
                self._settle(row)
        finally:
            self._on_event = self._cancelled = None
            self._options.clear()
            self._finalized.clear()
            self._finish_early = False
        self.stats.total_s += self.clock() - t0
        return [r.trace for r in rows]

    def _emit(self, kind: str, row: Row, **data: Any) -> None:
        if self._on_event is not None:
            self._on_event(RolloutEvent(kind, row.index, row.request_id, data))

    def _is_cancelled(self, row: Row) -> bool:
        return self._cancelled is not None and bool(self._cancelled(row.request_id))

    def run_messages(self, prompts: Sequence[list[dict[str, Any]]]) -> list[RolloutTrace]:
        """Roll out chat-message prompts (TRL's format: image parts carry PIL images)."""
        return self.run([RolloutRequest(messages=list(p)) for p in prompts])

    def rollout_batch(self, prompts: Sequence[list[dict[str, Any]]]) -> dict[str, Any]:
        """What TRL's ``GRPOTrainer(rollout_func=...)`` returns: ids, env mask, logprobs and the traces.

        ``env_mask`` is the completion mask (1 = model token, 0 = inserted); ``logprobs`` are 0.0 on inserted
        tokens. ``traces`` reaches reward functions as the ``traces`` keyword argument.
        """
        traces = self.run_messages(prompts)
        return {
            "prompt_ids": [list(t.prompt_ids) for t in traces],
            "completion_ids": [list(t.completion_ids) for t in traces],
            "env_mask": [list(t.completion_mask) for t in traces],
            "logprobs": [list(t.logprobs) for t in traces],
            "traces": traces,
        }

    def rollout_func(self) -> Callable[..., dict[str, Any]]:
        """A function with TRL 1.16's ``rollout_func(prompts, trainer)`` signature running this engine.

        TRL passes the per-process prompts already repeated ``num_generations`` times; one completion each.
        """

        def rollout(prompts: Sequence[Any], trainer: Any = None) -> dict[str, Any]:
            return self.rollout_batch([p if isinstance(p, list) else [{"role": "user", "content": str(p)}]
                                       for p in prompts])

        rollout.__name__ = "medrwr_rollout"
        return rollout

    # ------------------------------------------------------------------ the loop

    def continue_rows(self, rows: list[Row], *, admit: Callable[[], Sequence[RolloutRequest]] | None = None) -> None:
        """Run the loop until every row is done (a bounded number of turns per row; every turn ends a row or
        spends budget). ``admit`` appends rows for new requests before each turn. CDIR calls it again for the
        rows it reopened."""
        cfg = self.config
        max_turns = 4 * (cfg.max_rounds + 2) + 8
        turns: dict[int, int] = {}
        while True:
            if admit is not None:
                rows.extend(self._prepare(r, len(rows)) for r in list(admit()))
            for r in rows:
                if not r.done and turns.get(id(r), 0) >= max_turns:  # pragma: no cover - budgets end rows first
                    r.finish("no_progress", "turn limit reached")
            active = [r for r in rows if not r.done]
            if not active:
                return
            for r in active:
                turns[id(r)] = turns.get(id(r), 0) + 1
            self._step(active)
            if self._finish_early:
                for r in active:
                    if r.done:
                        self._settle(r)

    def _settle(self, row: Row) -> None:
        """Finalise a done row's trace and send its ``finish`` event, once."""
        if id(row) in self._finalized:
            return
        self._finalized.add(id(row))
        self._finalize(row)
        self._emit("finish", row, trace=row.trace)

    def _budget(self, row: Row) -> int:
        return min(self.config.max_new_tokens_per_turn, self.config.max_total_new_tokens - row.transcript.model_tokens)

    def _step(self, active: Sequence[Row]) -> None:
        runnable = []
        for row in active:
            if self._is_cancelled(row):
                row.finish("error", CANCELLED)
            elif self._budget(row) <= 0:
                row.finish("max_tokens", "total token budget spent")
            else:
                runnable.append(row)
        if not runnable:
            return
        states = [GenerationState(r.transcript.next_input(), r.transcript.mm, r.request_id) for r in runnable]
        budgets = [self._budget(r) for r in runnable]
        extra: dict[str, Any] = {}
        if self.constrain:
            extra["constraints"] = [self.turn_grammar(r, b) for r, b in zip(runnable, budgets)]
        if self._on_event is not None or self._cancelled is not None:
            if getattr(self.backend, "supports_token_callback", False):
                extra["on_token"] = self._token_callback(runnable)
        t0 = self.clock()
        conts = self.backend.generate(
            states, protocol.STOP_STRINGS, budgets, watch_token_ids=self._watch_ids, **extra
        )
        self.stats.generate_s += self.clock() - t0
        self.stats.generate_calls += 1
        if len(conts) != len(states):
            raise BackendError(f"the backend returned {len(conts)} continuations for {len(states)} states")
        pending: list[tuple[Row, list[str]]] = []
        for row, cont, budget in zip(runnable, conts, budgets):
            if len(cont.token_ids) > budget:
                raise BackendError(f"the backend generated {len(cont.token_ids)} tokens for a budget of {budget}")
            queries = self._absorb_turn(row, cont)
            if self._is_cancelled(row):
                row.finish("error", CANCELLED)
                continue
            if not self._supports_tokens() and cont.token_ids:
                self._emit("tokens", row, ids=list(cont.token_ids))
            if queries:
                self._emit("query", row, round=row.trace.rounds + 1, queries=list(queries))
                pending.append((row, queries))
        if pending:
            self._retrieve(pending)

    def _supports_tokens(self) -> bool:
        return bool(getattr(self.backend, "supports_token_callback", False))

    def _token_callback(self, runnable: Sequence[Row]) -> Callable[[int, int], bool]:
        """``on_token(batch_index, token_id) -> stop?`` for the backend: stream the token, stop cancelled rows."""

        def on_token(b: int, token_id: int) -> bool:
            row = runnable[b]
            self._emit("tokens", row, ids=[int(token_id)])
            return self._is_cancelled(row)

        return on_token

    def turn_grammar(self, row: Row, budget: int):
        """The grammar of ``row``'s next turn under ``constrain="protocol"``: query allowed while retrievals
        remain, answer letters limited to the row's options (with their texts when the request gave them)."""
        from medrwr.rollout.constrain import turn_grammar

        cfg = self.config
        return turn_grammar(
            row.letters,
            self._options.get(id(row)),
            allow_query=row.trace.rounds < cfg.max_rounds,
            budget=budget,
            max_think_tokens=cfg.constrain_max_think_tokens,
            max_query_tokens=cfg.constrain_max_query_tokens,
        )

    def _absorb_turn(self, row: Row, cont: Continuation) -> list[str]:
        """Append one turn's model tokens; return its queries (empty when the row is finished)."""
        tr = row.trace
        turn = row.transcript.append_model(cont.token_ids, cont.logprobs)
        tr.metadata["turns"] = row.transcript.turns
        if not turn.ids:
            row.finish("no_progress", "the model generated no tokens")
            return []
        answers = [s for s in turn.segments if s.kind == protocol.ANSWER and s.closed]
        if answers:
            self._read_answer(row, cont, turn, answers[-1])
            row.finish("answer")
            return []
        if cont.finish_reason == "stop" and cont.stop_string == protocol.QUERY_STOP:
            blocks = [s for s in turn.segments if s.kind == protocol.QUERY and s.closed]
            if not blocks:
                row.finish("error", "malformed_query: '</query>' without an opening <query> tag")
                return []
            queries = [" ".join(b.content.split()) for b in blocks]
            if not all(queries):
                row.finish("error", "empty_query: the model wrote an empty <query> block")
                return []
            qpt = self.config.queries_per_turn
            if qpt and len(queries) > qpt:
                tr.metadata.setdefault("ignored_queries", []).extend(queries[qpt:])
                queries = queries[:qpt]
            return queries
        if cont.finish_reason == "stop":
            row.finish("error", "malformed_answer: '</answer>' without an opening <answer> tag")
        elif cont.finish_reason == "eos":
            row.finish("eos", "the model ended without an answer block")
        else:
            total = row.transcript.model_tokens >= self.config.max_total_new_tokens
            which = "max_total_new_tokens" if total else "max_new_tokens_per_turn"
            row.finish("max_tokens", f"{which} reached before </query> or </answer>")
        return []

    # ------------------------------------------------------------------ confidence

    def _read_answer(self, row: Row, cont: Continuation, turn: ModelTurn, seg: protocol.Segment) -> None:
        tr = row.trace
        tr.answer = seg.content.strip()
        row.answer_start = turn.start
        content_start = seg.start + len(protocol.open_tag(protocol.ANSWER))
        content_end = seg.end - len(protocol.close_tag(protocol.ANSWER))
        m = protocol.ANSWER_CHOICE_START.search(turn.text[content_start:content_end])
        if m is None:
            return
        pos = protocol.token_index_at_char(self.codec.decode, turn.ids, content_start + m.start())
        tr.confidence = math.exp(float(cont.logprobs[pos]))
        tr.answer_position = turn.start + pos
        if row.letters:
            dist = cont.distribution_at(pos, self._watch_ids)
            mass = {L: 0.0 for L in row.letters}
            for tid, lp in dist.items():
                letter = self._watch_letter.get(tid)
                if letter in mass and lp > -1e30:
                    mass[letter] += math.exp(lp)
            total = sum(mass.values())
            if total > 0:
                tr.option_probs = {L: v / total for L, v in mass.items()}
        if row.transcript.turns == 1:  # answered in the first generation pass, before any retrieval
            tr.first_pass_option_probs = dict(tr.option_probs) if tr.option_probs else None

    # ------------------------------------------------------------------ retrieval

    def _search(self, queries: list[str]) -> tuple[list[list[Hit]] | None, str | None, float]:
        """One batched retriever call; never raises (failures come back as an error string)."""
        return search_batch(self.retriever, queries, self.k, self.search_mode, self.config.retrieval_timeout_s,
                            self.clock)

    def _retrieve(self, pending: list[tuple[Row, list[str]]]) -> None:
        to_search: list[tuple[Row, list[str]]] = []
        for row, queries in pending:
            if row.trace.rounds >= self.config.max_rounds:
                row.trace.queries.extend(queries)
                if row.budget_notices >= 1:
                    row.finish("max_rounds", f"query after the search budget ({self.config.max_rounds}) was spent")
                    continue
                row.budget_notices += 1
                row.trace.metadata.setdefault("over_budget_queries", []).extend(queries)
                for _ in queries:
                    row.transcript.insert_after_turn(
                        protocol.RETRIEVE, protocol.format_budget_notice(self.config.max_rounds)
                    )
                continue
            to_search.append((row, queries))
        if not to_search:
            return
        flat = [q for _, qs in to_search for q in qs]
        results, error, seconds = self._search(flat)
        self.stats.retrieval_s += seconds
        self.stats.retrieval_calls += 1
        i = 0
        for row, queries in to_search:
            row.trace.rounds += 1
            row.trace.queries.extend(queries)
            hits = results[i : i + len(queries)] if results is not None else [[] for _ in queries]
            i += len(queries)
            record = RetrievalRecord(
                round=row.trace.rounds, queries=list(queries), hits=[list(h) for h in hits], error=error,
                seconds=seconds,
            )
            for query_hits in hits:
                if error is not None:
                    text, ids, truncated = self.format_failure(error)
                else:
                    text, ids, truncated = self.format_hits(query_hits)
                row.transcript.insert_after_turn(protocol.RETRIEVE, text, ids)
                record.inserted_tokens.append(len(ids))
                record.truncated = record.truncated or truncated
            row.trace.retrievals.append(record)
            self._emit("retrieval", row, record=record)

    def format_failure(self, reason: str) -> tuple[str, list[int], bool]:
        """The retrieve block saying why retrieval failed: (text, ids, truncated=False)."""
        text = protocol.format_retrieval_failure(reason)
        return text, self.codec.encode(text), False

    def format_hits(self, hits: Sequence[Hit]) -> tuple[str, list[int], bool]:
        """The retrieve block for one query's hits, at most ``max_inserted_tokens`` tokens (docs truncated)."""
        return fit_retrieval_block(self.codec, [h.text for h in hits], self.config.max_inserted_tokens)

    # ------------------------------------------------------------------ finishing

    def _finalize(self, row: Row) -> None:
        tr, t = row.trace, row.transcript
        tr.completion_ids, tr.completion_mask, tr.logprobs = list(t.ids), list(t.mask), list(t.logprobs)
        tr.spans = list(t.spans)
        self.stats.model_tokens += t.generated_tokens
        self.stats.inserted_tokens += t.inserted_tokens
        tr.completion_text = t.text()
        parsed = protocol.parse_completion(tr.completion_text)
        tr.valid = parsed.valid
        if parsed.answer is not None and tr.answer is None:
            tr.answer = parsed.answer
        tr.choice = protocol.extract_choice(tr.answer, row.letters or protocol.OPTION_LETTERS)
        if not parsed.valid:
            tr.metadata["invalid"] = parsed.error
        if tr.stop_reason is None:  # pragma: no cover - every path sets it
            tr.stop_reason = "error"
            tr.error = tr.error or "rollout ended without a stop reason"


# ---------------------------------------------------------------------- building from config


def engine_from_config(
    cfg: Any,
    *,
    backend: PolicyBackend | None = None,
    retriever: Retriever | None = None,
    image_retriever: ImageRetriever | None = None,
) -> RolloutEngine:
    """A :class:`RolloutEngine` for a :class:`medrwr.config.Config`; pass any part to use it instead.

    The retrievers come from :func:`medrwr.retrieval.open.open_retriever` /
    :func:`~medrwr.retrieval.open.open_image_retriever` (one precedence rule for search settings);
    searches run in the retriever's ``default_mode`` unless the user set ``retrieval.mode``.
    """
    if backend is None:
        from medrwr.rollout.backends import build_backend

        backend = build_backend(cfg.model, cfg.rollout)
    if retriever is None:
        from medrwr.retrieval.open import open_retriever

        retriever = open_retriever(cfg)
    if image_retriever is None and cfg.cdir.enabled:
        from medrwr.retrieval.open import open_image_retriever

        image_retriever = open_image_retriever(cfg)
    from medrwr.rollout.constrain import resolve_constrain

    mode: str | None = cfg.retrieval.mode if "mode" in cfg.retrieval.explicit_keys() else None
    if mode is not None and mode not in retriever.modes:
        logger.warning("retrieval mode %r is not available (%s); using %s",
                       mode, ", ".join(retriever.modes), retriever.default_mode)
        mode = None
    return RolloutEngine(
        backend,
        retriever,
        cfg.rollout,
        k=cfg.retrieval.k,
        search_mode=mode,
        image_retriever=image_retriever,
        cdir=cfg.cdir,
        constrain=resolve_constrain(cfg.model, cfg.rollout),
    )
