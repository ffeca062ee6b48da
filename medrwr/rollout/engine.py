"""The reason-query-retrieve loop, token-in/token-out (METHOD.md §1, DESIGN.md).

One :class:`RolloutEngine.run` call drives a batch of samples:

1. render each prompt with the backend's chat template (token ids + images);
2. generate every unfinished row until ``</query>``, ``</answer>``, end-of-sequence or its token budget;
3. parse the decoded text of *this turn's model tokens* (decoding for parsing only; the running completion is
   never re-encoded) for queries and the answer;
4. send the queries of every row paused at a query in ONE batched ``Retriever.search`` call;
5. tokenise each retrieve block on its own and append its ids with mask 0; continue.

A prefix check guards the invariant the whole design rests on: the ids fed to a row's next turn extend the
ids fed to its previous turn plus the tokens generated there, exactly. A violation is our bug and raises
:class:`RolloutDriftError`. Model mistakes (an empty query, a missing closing tag, a spent budget) end the
row with a ``stop_reason``/``error`` on its trace, never an exception; a failing retriever inserts an explicit
"retrieval failed" block and the rollout continues.

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
* Confidence is the probability of the token holding the answer's first character that is not whitespace or
  an opening bracket/quote/``*`` (so ``(B)`` and ``**B**`` read the letter), from the generation log-probs; the
  option distribution sums each letter's single-token variants (``B``, ``b``, `` B``, ``>B``, ``(B``...) at
  that position and renormalises over the sample's options.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrwr import protocol
from medrwr.config import CDIRConfig, RolloutConfig
from medrwr.errors import RolloutDriftError  # noqa: F401 (re-exported)
from medrwr.retrieval.base import (
    Hit,
    ImageRetriever,
    RetrievalError,
    RetrievalTimeout,
    Retriever,
)
from medrwr.rollout.backends.base import (
    BackendError,
    Continuation,
    GenerationState,
    MultimodalInputs,
    PolicyBackend,
    PromptInputs,
)
from medrwr.rollout.trace import RetrievalRecord, RolloutTrace, TokenSpan

logger = logging.getLogger(__name__)

__all__ = [
    "EngineStats",
    "RolloutDriftError",
    "RolloutEngine",
    "RolloutRequest",
    "build_image_retriever",
    "build_retriever",
    "engine_from_config",
    "load_image",
]


def load_image(image: Any, max_pixels: int | None = None) -> Any:
    """A PIL RGB image (PIL image, path, DICOM or bytes; see ``retrieval.image_io.load_image``), downscaled to at
    most ``max_pixels`` with its aspect kept."""
    from medrwr.retrieval.image_io import load_image as open_image

    img = open_image(image)
    if max_pixels and img.width * img.height > max_pixels:
        scale = math.sqrt(max_pixels / (img.width * img.height))
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))
    return img


_TIMED_OUT = object()


def _call_with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """``fn()`` in a daemon thread; :data:`_TIMED_OUT` when it has not returned after ``timeout`` seconds.

    A daemon thread, not an executor: a retriever that hangs for good must not keep the process from exiting.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run, name="medrwr-search", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return _TIMED_OUT
    if "error" in box:
        raise box["error"]
    return box["value"]


def _image_ref(image: Any) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    name = getattr(image, "filename", "") or ""
    if name:
        return str(name)
    size = getattr(image, "size", None)
    return f"<in-memory image {size[0]}x{size[1]}>" if size else "<in-memory image>"


@dataclass
class RolloutRequest:
    """One question: image(s), question text, options. Or ready-made chat ``messages`` (TRL prompts)."""

    question: str = ""
    options: Sequence[str] | dict[str, str] | None = None
    images: Sequence[Any] = ()
    messages: list[dict[str, Any]] | None = None
    request_id: str | None = None
    system: str | None = None
    """System prompt; None uses the protocol's (image or text variant)."""
    metadata: dict[str, Any] = field(default_factory=dict)

    def option_letters(self) -> str:
        if self.options:
            keys = list(self.options.keys()) if isinstance(self.options, dict) else None
            if keys is not None:
                return "".join(str(k).strip().upper()[:1] for k in keys)
            return protocol.OPTION_LETTERS[: len(self.options)]
        if self.messages is not None:
            return protocol.option_letters_in(_last_user_text(self.messages))
        return protocol.option_letters_in(self.question)


def _last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            c = m.get("content", "")
            if isinstance(c, str):
                return c
            return "\n".join(str(p.get("text", "")) for p in c if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _images_in(messages: Sequence[dict[str, Any]]) -> list[Any]:
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, list):
            for p in c:
                if isinstance(p, dict) and (p.get("type") == "image" or "image" in p) and p.get("image") is not None:
                    out.append(p["image"])
    return out


@dataclass
class _Row:
    index: int
    request_id: str
    prompt_ids: list[int]
    mm: MultimodalInputs | None
    letters: str
    trace: RolloutTrace
    source_images: list[Any]
    new_tokens: int = 0
    done: bool = False
    budget_notices: int = 0
    fed: list[int] | None = None
    expected_prefix: list[int] | None = None
    last_turn_start: int = 0
    cdir_done: bool = False
    answer_turn: dict[str, Any] | None = None


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
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.backend = backend
        self.tokenizer = backend.tokenizer
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
        self._watch_ids, self._watch_letter = self._build_watch_table()
        self._eos = set(backend.eos_token_ids())

    # ------------------------------------------------------------------ tokenizer helpers

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _build_watch_table(self) -> tuple[list[int], dict[int, str]]:
        """Single-token spellings of each option letter: ``B``, ``b``, `` B``, ``>B``, ``(B``... (whichever exist)."""
        letter_of = protocol.letter_token_ids(self._encode)
        return list(letter_of), letter_of

    def _token_end_at_char(self, ids: Sequence[int], char_end: int) -> int:
        """The smallest ``i`` with ``len(decode(ids[:i])) >= char_end``: tokens covering ``[0, char_end)``."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._decode(ids[:mid])) >= char_end:
                hi = mid
            else:
                lo = mid + 1
        return lo

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

    def _prepare(self, req: RolloutRequest, index: int) -> _Row:
        if req.messages is not None:
            messages = req.messages
            images = _images_in(messages)
        else:
            images = [load_image(img, self.config.max_image_pixels) for img in req.images]
            messages = self._messages_for(req, images)
        if images and not getattr(self.backend, "supports_images", False):
            raise BackendError(
                "this policy is text-only but the question has images: pass a vision-language model "
                "(e.g. --model Qwen/Qwen2.5-VL-7B-Instruct or a local Qwen2.5-VL folder)"
            )
        prompt: PromptInputs = self.backend.prepare_prompt(messages, images)
        rid = req.request_id if req.request_id is not None else str(index)
        refs = [_image_ref(img) for img in (req.images if req.messages is None else images)]
        trace = RolloutTrace(prompt_ids=list(prompt.prompt_ids), images=refs, metadata=dict(req.metadata))
        trace.metadata.setdefault("request_id", rid)
        return _Row(
            index=index,
            request_id=rid,
            prompt_ids=list(prompt.prompt_ids),
            mm=prompt.mm,
            letters=req.option_letters(),
            trace=trace,
            source_images=list(images),
        )

    # ------------------------------------------------------------------ public API

    def run(self, requests: Sequence[RolloutRequest]) -> list[RolloutTrace]:
        """Roll out every request; returns one trace per request, in order."""
        t0 = self.clock()
        rows = [self._prepare(r, i) for i, r in enumerate(requests)]
        self._loop(rows)
        if self.cdir.enabled and self.image_retriever is not None:
            from medrwr.rollout.cdir import run_cdir

            run_cdir(self, rows)
        for row in rows:
            self._finalize(row)
        self.stats.total_s += self.clock() - t0
        return [r.trace for r in rows]

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

    def _input_ids(self, row: _Row) -> list[int]:
        """The exact ids to continue: prompt ids followed by the completion ids, nothing re-encoded."""
        return row.prompt_ids + row.trace.completion_ids

    def _checked_ids(self, row: _Row) -> list[int]:
        ids = self._input_ids(row)
        expected = row.expected_prefix
        if expected is not None:
            n = len(expected)
            if len(ids) < n or ids[:n] != expected:
                bad = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), n))
                raise RolloutDriftError(
                    f"row {row.request_id}: the ids fed to turn {row.trace.metadata.get('turns', 0) + 1} do not "
                    f"extend the previous turn's ids (first difference at position {bad} of {n}: "
                    f"{ids[bad:bad + 5]} vs {expected[bad:bad + 5]}). Something re-tokenised or edited the "
                    "running sequence; this is a bug in the rollout code."
                )
        row.fed = ids
        return ids

    def _loop(self, rows: Sequence[_Row]) -> None:
        cfg = self.config
        max_turns = 4 * (cfg.max_rounds + 2) + 8  # a hard bound; every turn ends a row or consumes budget
        for _ in range(max_turns):
            active = [r for r in rows if not r.done]
            if not active:
                return
            self._step(active)
        for r in rows:
            if not r.done:  # pragma: no cover - the budgets above end every row first
                self._finish(r, "no_progress", "turn limit reached")

    def _budget(self, row: _Row) -> int:
        return min(self.config.max_new_tokens_per_turn, self.config.max_total_new_tokens - row.new_tokens)

    def _step(self, active: Sequence[_Row]) -> None:
        runnable = []
        for row in active:
            if self._budget(row) <= 0:
                self._finish(row, "max_tokens", "total token budget spent")
            else:
                runnable.append(row)
        if not runnable:
            return
        states = [GenerationState(self._checked_ids(r), r.mm, r.request_id) for r in runnable]
        budgets = [self._budget(r) for r in runnable]
        t0 = self.clock()
        conts = self.backend.generate(
            states, protocol.STOP_STRINGS, budgets, watch_token_ids=self._watch_ids
        )
        self.stats.generate_s += self.clock() - t0
        self.stats.generate_calls += 1
        if len(conts) != len(states):
            raise BackendError(f"the backend returned {len(conts)} continuations for {len(states)} states")
        pending: list[tuple[_Row, list[str]]] = []
        for row, cont, budget in zip(runnable, conts, budgets):
            if len(cont.token_ids) > budget:
                raise BackendError(
                    f"the backend generated {len(cont.token_ids)} tokens for a budget of {budget}"
                )
            queries = self._absorb_turn(row, cont)
            if queries:
                pending.append((row, queries))
        if pending:
            self._retrieve(pending)

    def _append(self, row: _Row, ids: Sequence[int], mask: int, logprobs: Sequence[float] | None = None) -> tuple[int, int]:
        tr = row.trace
        start = len(tr.completion_ids)
        tr.completion_ids.extend(int(t) for t in ids)
        tr.completion_mask.extend([mask] * len(ids))
        tr.logprobs.extend([float(x) for x in logprobs] if logprobs is not None else [0.0] * len(ids))
        return start, len(tr.completion_ids)

    def insert_text(self, row: _Row, kind: str, text: str, ids: Sequence[int] | None = None) -> TokenSpan:
        """Append environment text (tokenised on its own, or given as ``ids``) with mask 0 and record its span.

        Every span's ``text`` is the decoding of its own tokens, so the span texts joined give ``completion_text``.
        """
        ids = self._encode(text) if ids is None else list(ids)
        start, end = self._append(row, ids, 0)
        span = TokenSpan(kind, start, end, by_model=False, text=self._decode(ids))  # type: ignore[arg-type]
        row.trace.spans.append(span)
        self.stats.inserted_tokens += len(ids)
        return span

    def _model_spans(self, ids: Sequence[int], text: str, offset: int) -> list[TokenSpan]:
        """Token spans of the segments of one turn's model text (boundaries by prefix decoding).

        A token straddling two segments (``">\n"`` ends a block and holds the whitespace after it) belongs to
        the first segment it completes; segments left with no token of their own are dropped.
        """
        spans: list[TokenSpan] = []
        prev = 0
        segments = protocol.split_segments(text)
        for i, seg in enumerate(segments):
            end = len(ids) if i == len(segments) - 1 else self._token_end_at_char(ids, seg.end)
            if end > prev:
                spans.append(TokenSpan(seg.kind, offset + prev, offset + end, True))
                prev = end
        if prev < len(ids):  # trailing special tokens (eos) decode to nothing
            if spans:
                spans[-1].end = offset + len(ids)
            else:
                spans.append(TokenSpan("text", offset, offset + len(ids), True))
        for span in spans:
            span.text = self._decode(ids[span.start - offset : span.end - offset])
        return spans

    def _absorb_turn(self, row: _Row, cont: Continuation) -> list[str]:
        """Append one turn's model tokens; return its queries (empty when the row is finished)."""
        tr = row.trace
        ids = list(cont.token_ids)
        row.expected_prefix = (row.fed or []) + ids
        start, _ = self._append(row, ids, 1, cont.logprobs)
        row.last_turn_start = start
        row.new_tokens += len(ids)
        self.stats.model_tokens += len(ids)
        tr.metadata["turns"] = tr.metadata.get("turns", 0) + 1
        if not ids:
            self._finish(row, "no_progress", "the model generated no tokens")
            return []
        text = self._decode(ids)
        tr.spans.extend(self._model_spans(ids, text, start))
        segments = protocol.split_segments(text)
        answers = [s for s in segments if s.kind == protocol.ANSWER and s.closed]
        if answers:
            self._read_answer(row, cont, ids, text, answers[-1])
            self._finish(row, "answer")
            return []
        if cont.finish_reason == "stop" and cont.stop_string == protocol.QUERY_STOP:
            blocks = [s for s in segments if s.kind == protocol.QUERY and s.closed]
            if not blocks:
                self._finish(row, "error", "malformed_query: '</query>' without an opening <query> tag")
                return []
            queries = [" ".join(b.content.split()) for b in blocks]
            if not all(queries):
                self._finish(row, "error", "empty_query: the model wrote an empty <query> block")
                return []
            qpt = self.config.queries_per_turn
            if qpt and len(queries) > qpt:
                tr.metadata.setdefault("ignored_queries", []).extend(queries[qpt:])
                queries = queries[:qpt]
            return queries
        if cont.finish_reason == "stop":
            self._finish(row, "error", "malformed_answer: '</answer>' without an opening <answer> tag")
        elif cont.finish_reason == "eos":
            self._finish(row, "eos", "the model ended without an answer block")
        else:
            total = row.new_tokens >= self.config.max_total_new_tokens
            which = "max_total_new_tokens" if total else "max_new_tokens_per_turn"
            self._finish(row, "max_tokens", f"{which} reached before </query> or </answer>")
        return []

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        row.done = True
        row.trace.stop_reason = reason  # type: ignore[assignment]
        if error and reason != "answer":
            row.trace.error = error

    # ------------------------------------------------------------------ confidence

    def _read_answer(self, row: _Row, cont: Continuation, ids: list[int], text: str, seg: protocol.Segment) -> None:
        tr = row.trace
        tr.answer = seg.content.strip()
        content_start = seg.start + len(protocol.open_tag(protocol.ANSWER))
        content_end = seg.end - len(protocol.close_tag(protocol.ANSWER))
        m = protocol.ANSWER_CHOICE_START.search(text[content_start:content_end])
        row.answer_turn = {"start": row.last_turn_start}
        if m is None:
            return
        pos = protocol.token_index_at_char(self._decode, ids, content_start + m.start())
        tr.confidence = math.exp(float(cont.logprobs[pos]))
        row.answer_turn["position"] = row.last_turn_start + pos
        letters = row.letters or ""
        if not letters:
            return
        dist = cont.distribution_at(pos, self._watch_ids)
        mass = {L: 0.0 for L in letters}
        for tid, lp in dist.items():
            letter = self._watch_letter.get(tid)
            if letter in mass and lp > -1e30:
                mass[letter] += math.exp(lp)
        total = sum(mass.values())
        if total > 0:
            tr.option_probs = {L: v / total for L, v in mass.items()}

    # ------------------------------------------------------------------ retrieval

    def _search(self, queries: list[str]) -> tuple[list[list[Hit]] | None, str | None, float]:
        """One batched retriever call; never raises (failures come back as an error string)."""
        if self.retriever is None:
            return None, "no retriever configured", 0.0
        t0 = self.clock()
        timeout = self.config.retrieval_timeout_s
        try:
            call = functools.partial(self.retriever.search, queries, self.k, self.search_mode)
            results = _call_with_timeout(call, timeout) if timeout and timeout > 0 else call()
            if results is _TIMED_OUT:
                raise RetrievalTimeout(f"the retriever did not answer within {timeout:g} s", queries)
            if not isinstance(results, list) or len(results) != len(queries):
                n = len(results) if isinstance(results, list) else type(results).__name__
                raise RetrievalError(f"the retriever returned {n} result lists for {len(queries)} queries", queries)
            results = [[h for h in hs][: self.k] for hs in results]
            return results, None, self.clock() - t0
        except Exception as exc:  # noqa: BLE001 - any retriever failure is recorded, the rollout continues
            logger.warning("retrieval failed for %d queries: %s: %s", len(queries), type(exc).__name__, exc)
            return None, f"{type(exc).__name__}: {exc}", self.clock() - t0

    def _retrieve(self, pending: list[tuple[_Row, list[str]]]) -> None:
        to_search: list[tuple[_Row, list[str]]] = []
        for row, queries in pending:
            if row.trace.rounds >= self.config.max_rounds:
                if row.budget_notices >= 1:
                    row.trace.queries.extend(queries)
                    self._finish(row, "max_rounds", f"query after the search budget ({self.config.max_rounds}) was spent")
                    continue
                row.budget_notices += 1
                row.trace.queries.extend(queries)
                row.trace.metadata.setdefault("over_budget_queries", []).extend(queries)
                for _ in queries:
                    self._insert_block(row, protocol.format_budget_notice(self.config.max_rounds))
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
                self._insert_block(row, text, ids)
                record.inserted_tokens.append(len(ids))
                record.truncated = record.truncated or truncated
            row.trace.retrievals.append(record)

    def _insert_block(self, row: _Row, text: str, ids: list[int] | None = None) -> None:
        last = row.trace.completion_ids[row.last_turn_start :]
        turn_text = self._decode(last) if last else ""
        if turn_text and not turn_text[-1].isspace():
            self.insert_text(row, "text", "\n")
        self.insert_text(row, "retrieve", text, ids)
        row.last_turn_start = len(row.trace.completion_ids)

    def format_failure(self, reason: str) -> tuple[str, list[int], bool]:
        text = protocol.format_retrieval_failure(reason)
        return text, self._encode(text), False

    def format_hits(self, hits: Sequence[Hit]) -> tuple[str, list[int], bool]:
        """The retrieve block for one query's hits, at most ``max_inserted_tokens`` tokens (docs truncated)."""
        docs = [h.text for h in hits]
        text = protocol.format_retrieval(docs)
        ids = self._encode(text)
        budget = self.config.max_inserted_tokens
        if len(ids) <= budget:
            return text, ids, False
        doc_ids = [self._encode(" ".join(protocol.sanitize_document(d).split())) for d in docs]
        skeleton = len(self._encode(protocol.format_retrieval(["x"] * len(docs)))) - len(docs)
        room = max(budget - skeleton - 2 * len(docs), len(docs))
        for _ in range(8):
            caps = _water_fill([len(d) for d in doc_ids], room)
            cut = [self._decode(d[:c]).rstrip("\ufffd").strip() + (" …" if c < len(d) else "") for d, c in zip(doc_ids, caps)]
            text = protocol.format_retrieval([c if c.strip(" …") else "…" for c in cut])
            ids = self._encode(text)
            if len(ids) <= budget:
                return text, ids, True
            room = max(room - (len(ids) - budget) - len(docs), 0)
        text = protocol.format_retrieval(["…"] * len(docs))
        return text, self._encode(text), True

    # ------------------------------------------------------------------ finishing

    def _finalize(self, row: _Row) -> None:
        tr = row.trace
        tr.completion_text = self._decode(tr.completion_ids)
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


def _water_fill(lengths: Sequence[int], room: int) -> list[int]:
    """Per-document token caps summing to at most ``room``: short documents keep everything."""
    caps = [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    left = room
    for j, i in enumerate(order):
        share = left // (len(order) - j)
        caps[i] = min(lengths[i], share)
        left -= caps[i]
    return caps


# ---------------------------------------------------------------------- building from config


def build_retriever(retrieval: Any) -> Retriever:
    """The knowledge-base retriever a config names: a server URL, an index folder, or the shipped default KB."""
    if retrieval.url:
        from medrwr.retrieval.service.client import RetrievalClient

        return RetrievalClient(retrieval.url, mode=retrieval.mode)
    from medrwr.retrieval.index.hybrid import HybridRetriever

    if retrieval.index:
        return HybridRetriever.load(retrieval.index)
    from medrwr.kb.default import ensure_default_index

    return HybridRetriever.load(ensure_default_index())


def build_image_retriever(cdir: CDIRConfig) -> ImageRetriever:
    """The CDIR image index a config names, or the demo index built from packaged sample images."""
    from medrwr.retrieval.index.images import (
        ImageIndex,
        build_demo_image_index,
        default_demo_image_index_path,
    )

    if cdir.image_index:
        return ImageIndex.load(cdir.image_index)
    path = default_demo_image_index_path()
    if not (path / "manifest.json").is_file():
        build_demo_image_index(path)
    return ImageIndex.load(path)


def engine_from_config(
    cfg: Any,
    *,
    backend: PolicyBackend | None = None,
    retriever: Retriever | None = None,
    image_retriever: ImageRetriever | None = None,
) -> RolloutEngine:
    """A :class:`RolloutEngine` for a :class:`medrwr.config.Config`; pass any part to use it instead."""
    if backend is None:
        from medrwr.rollout.backends import build_backend

        backend = build_backend(cfg.model, cfg.rollout)
    if retriever is None:
        retriever = build_retriever(cfg.retrieval)
    if image_retriever is None and cfg.cdir.enabled:
        image_retriever = build_image_retriever(cfg.cdir)
    mode: str | None = cfg.retrieval.mode
    available = getattr(retriever, "modes", None)
    if available is not None and mode not in available:
        logger.warning("retrieval mode %r is not available in this index (%s); using %s", mode, available, available[0])
        mode = available[0]
    return RolloutEngine(
        backend,
        retriever,
        cfg.rollout,
        k=cfg.retrieval.k,
        search_mode=mode,
        image_retriever=image_retriever,
        cdir=cfg.cdir,
    )
