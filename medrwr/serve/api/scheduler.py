"""Batching concurrent chat requests into the rollout engine, continuously at turn boundaries.

The first waiting request opens a window of ``server.api_batch_wait_ms``; every waiting request with the same
sampling settings (temperature, top-p, seed, ``max_tokens``, CDIR) joins it, up to ``server.api_max_batch`` rows,
and the batch runs on one worker thread (``RolloutEngine.run``; inside it every generate call covers all
unfinished rows). While it runs, requests with the batch's settings that reach the head of the queue join it
before the engine's next turn (``run(admit=...)``; with the KV cache a joining row only prefills its own prompt
past the shared system prompt), and each request is answered as soon as its rows are done (without CDIR). A
running ``generate`` call cannot take new rows (transformers), so a newcomer waits at most one turn. Requests
with other settings wait for the batch to end (first come, first served: nothing joins past them).

Back-pressure: more than ``server.api_max_queue`` waiting requests are refused (:class:`QueueFull`, answered
429 with ``Retry-After``); a draining server refuses new ones (503). A job whose client went away is skipped if
still queued, and its rows stop generating if running (``RolloutEngine.run(cancelled=...)``).

Events cross from the worker thread to the request's asyncio queue with ``loop.call_soon_threadsafe``; the
waiting queue is shared by the event loop and the worker thread under a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from medrwr.rollout.engine import RolloutEngine, RolloutEvent, RolloutRequest
from medrwr.serve.api.metrics import APIMetrics
from medrwr.serve.api.requests import ChatInput
from medrwr.serve.api.streaming import Detokenizer
from medrwr.serve.api.views import cdir_view, retrieval_view

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """Too many requests are waiting."""


class Draining(Exception):
    """The server is shutting down."""


@dataclass
class Job:
    """One chat request in flight: its input, where its events go, whether its client is gone."""

    chat: ChatInput
    request_id: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    t0: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    answered: bool = False

    def key(self) -> tuple:
        c = self.chat
        return (c.temperature, c.top_p, c.seed, c.max_tokens, c.cdir)

    def post(self, item: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Scheduler:
    """Owns the engine: one worker thread runs one engine batch at a time (see the module docstring)."""

    def __init__(self, engine: RolloutEngine, *, max_queue: int, max_batch: int, wait_ms: float,
                 metrics: APIMetrics):
        self.engine = engine
        self.max_queue, self.max_batch, self.wait_s = max_queue, max_batch, wait_ms / 1000.0
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._lock = threading.Lock()  # the queue is touched by the event loop and by the worker's admit()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medrwr-engine")
        self._task: asyncio.Task | None = None
        self._running = 0
        self._draining = False
        self._ids = itertools.count()
        self._batch_s = 1.0  # running mean of seconds per engine batch, for Retry-After
        backend = engine.backend
        self._base = (engine.config, engine.cdir, getattr(backend, "temperature", None),
                      getattr(backend, "top_p", None), getattr(backend, "seed", None))

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="medrwr-scheduler")

    async def close(self) -> None:
        """Drain: refuse new jobs, finish the queued and running ones, then stop the worker."""
        self._draining = True
        while self._queue or self._running:
            self._wake.set()
            await asyncio.sleep(0.02)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def draining(self) -> bool:
        return self._draining

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self._batch_s * (1 + len(self._queue) / self.max_batch)))

    def submit(self, chat: ChatInput, request_id: str) -> Job:
        if self._draining:
            raise Draining
        if len(self._queue) >= self.max_queue:
            raise QueueFull
        job = Job(chat, request_id, asyncio.get_running_loop())
        with self._lock:
            self._queue.append(job)
        self.metrics.queue_depth.set(len(self._queue))
        self._wake.set()
        return job

    # ---------------------------------------------------------------- the loop

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if self.wait_s and not self._draining:
                await asyncio.sleep(self.wait_s)
            batch = self._take()
            self.metrics.queue_depth.set(len(self._queue))
            if not batch:
                continue
            self._running += 1
            t0 = time.perf_counter()
            try:
                await loop.run_in_executor(self._executor, self._run_batch, batch)
            finally:
                self._running -= 1
                self._batch_s = 0.7 * self._batch_s + 0.3 * (time.perf_counter() - t0)

    def _take(self, key: tuple | None = None, room: int | None = None) -> list[Job]:
        """Waiting jobs for one batch: the first live job's settings (or ``key``: jobs joining a running batch,
        only while the queue's head has that key), up to ``room`` rows (default ``max_batch``)."""
        joining = key is not None
        room = self.max_batch if room is None else room
        with self._lock:
            while self._queue and self._queue[0].cancelled:
                self._queue.popleft()
            if not self._queue or room <= 0 or (joining and self._queue[0].key() != key):
                return []
            key = self._queue[0].key()
            batch, rows, keep = [], 0, deque()
            while self._queue:
                job = self._queue.popleft()
                if job.cancelled:
                    continue
                fits = rows + job.chat.n <= room or (not batch and not joining)  # a lone big job still runs
                if job.key() == key and fits:
                    batch.append(job)
                    rows += job.chat.n
                else:
                    keep.append(job)
            self._queue = keep
        return batch

    # ---------------------------------------------------------------- the worker thread

    def _configure(self, key: tuple) -> None:
        """Put the batch's sampling settings on the engine and backend (one batch runs at a time)."""
        temperature, top_p, seed, max_tokens, cdir = key
        rollout, cdir_cfg, base_t, base_p, base_seed = self._base
        eng, backend = self.engine, self.engine.backend
        total = max_tokens or rollout.max_total_new_tokens
        eng.config = dataclasses.replace(rollout, max_total_new_tokens=total,
                                         max_new_tokens_per_turn=min(rollout.max_new_tokens_per_turn, total))
        eng.cdir = dataclasses.replace(cdir_cfg, enabled=bool(cdir))
        for name, value, base in (("temperature", temperature, base_t), ("top_p", top_p, base_p),
                                  ("seed", seed, base_seed)):
            if base is not None or value is not None:
                setattr(backend, name, value if value is not None else base)

    def _run_batch(self, jobs: list[Job]) -> None:
        self.metrics.batch_size.observe(sum(j.chat.n for j in jobs))
        try:
            self._run(jobs)
        except Exception as exc:  # noqa: BLE001 - isolate the request that broke the batch
            if len(jobs) > 1:
                logger.warning("an engine batch of %d requests failed (%s); running them one by one", len(jobs), exc)
                for job in [j for j in jobs if not j.answered]:
                    try:
                        self._run([job])
                    except Exception as one:  # noqa: BLE001
                        self._fail(job, one)
            else:
                self._fail(jobs[0], exc)

    def _fail(self, job: Job, exc: Exception) -> None:
        logger.exception("rollout failed for %s", job.request_id, exc_info=exc)
        job.post(("error", exc))

    def _run(self, jobs: list[Job]) -> None:
        """One engine batch; ``jobs`` grows with the jobs admitted while it runs."""
        self._configure(jobs[0].key())
        key = jobs[0].key()
        rows: dict[str, tuple[Job, int, Detokenizer]] = {}
        done: dict[int, dict[int, Any]] = {}
        live = [0]

        def requests_for(job: Job) -> list[RolloutRequest]:
            c = job.chat
            out = []
            for i in range(c.n):
                rid = f"{job.request_id}#{i}"
                rows[rid] = (job, i, Detokenizer(self.engine.tokenizer))
                out.append(RolloutRequest(question=c.question, options=c.options, images=list(c.images),
                                          request_id=rid, metadata={"warnings": list(c.warnings)}))
            live[0] += c.n
            return out

        requests = [r for job in jobs for r in requests_for(job)]

        def admit() -> list[RolloutRequest]:
            joining = self._take(key, self.max_batch - live[0]) if not self._draining else []
            if joining:
                self.metrics.queue_depth.set(len(self._queue))
                jobs.extend(joining)
            return [r for job in joining for r in requests_for(job)]

        def on_event(ev: RolloutEvent) -> None:
            job, i, detok = rows[ev.request_id]
            if ev.kind == "finish":
                live[0] -= 1
                got = done.setdefault(id(job), {})
                got[i] = ev.data["trace"]
                if len(got) == job.chat.n:
                    self._answer(job, [got[k] for k in range(job.chat.n)])
                return
            if job.cancelled:
                return
            if ev.kind == "tokens":
                text = detok.add(ev.data["ids"])
                if text:
                    if job.first_token_s is None:
                        job.first_token_s = time.perf_counter() - job.t0
                        self.metrics.ttft.observe(job.first_token_s)
                    job.post(("text", i, text))
            elif ev.kind == "query":
                for q in ev.data["queries"]:
                    job.post(("event", i, "medrwr.query", {"round": ev.data["round"], "query": q}))
            elif ev.kind == "retrieval":
                job.post(("event", i, "medrwr.retrieval", retrieval_view(ev.data["record"])))
            elif ev.kind == "cdir":
                job.post(("event", i, "medrwr.cdir", cdir_view(ev.data["record"])))

        def cancelled(rid: str) -> bool:
            return rows[rid][0].cancelled

        traces = self.engine.run(requests, on_event=on_event, cancelled=cancelled, admit=admit)
        by_job: dict[int, list] = {}
        for rid, trace in zip(rows, traces):
            by_job.setdefault(id(rows[rid][0]), []).append(trace)
        for job in jobs:
            if not job.answered:  # pragma: no cover - every row sends its finish event
                self._answer(job, by_job[id(job)])

    def _answer(self, job: Job, ts: list) -> None:
        job.answered = True
        seconds = time.perf_counter() - job.t0
        model_tokens = sum(t.num_model_tokens for t in ts)
        if seconds > 0 and model_tokens:
            self.metrics.tokens_per_s.observe(model_tokens / seconds)
        for t in ts:
            self.metrics.retrievals.observe(t.rounds)
        self.metrics.model_tokens.inc(model_tokens)
        self.metrics.inserted_tokens.inc(sum(t.num_inserted_tokens for t in ts))
        job.post(("done", ts))


__all__ = ["Draining", "Job", "QueueFull", "Scheduler"]
