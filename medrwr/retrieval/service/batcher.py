"""Dynamic batching: concurrent requests merged into one retriever call, off the event loop."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from medrwr.retrieval.service.errors import APIError
from medrwr.retrieval.service.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    items: list[Any]
    k: int
    future: asyncio.Future


class QueueFull(Exception):
    """The batcher's bounded queue cannot take the request."""


class Batcher:
    """Merge concurrent requests into one retriever call.

    Jobs queue up; the loop takes up to ``max_batch`` items (waiting at most ``max_wait_s`` for more
    while the queue is short), groups them by ``k`` (fusion depth can depend on k, so slicing a
    bigger-k result would not be exact), and runs ``call(items, k)`` on the retriever's single
    worker thread, off the event loop. At most ``max_queue`` items wait; beyond that
    :meth:`submit` raises :class:`QueueFull` instead of growing memory.
    """

    def __init__(
        self,
        name: str,
        call: Callable[[list[Any], int], list[list[Any]]],
        executor: ThreadPoolExecutor,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        metrics: Metrics,
    ):
        self.name = name
        self._call = call
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._metrics = metrics
        self._pending: deque[_Job] = deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._ema_item_s = 0.01  # running estimate of seconds per item, for Retry-After
        self._last_batch = 0

    @property
    def queued(self) -> int:
        return self._queued

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"medrwr-batcher-{self.name}")

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained: what a turned-away client should wait."""
        return max(1, math.ceil(self._queued * self._ema_item_s))

    def submit(self, items: list[Any], k: int) -> asyncio.Future:
        if self._closing:
            raise APIError(
                503, "the server is shutting down; retry on another replica or later", code="shutting_down",
                headers={"Retry-After": "1"},
            )
        if self._queued + len(items) > self.max_queue:
            raise QueueFull()
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(list(items), k, fut))
        self._queued += len(items)
        self._metrics.queue_depth.labels(self.name).set(self._queued)
        self._wakeup.set()
        return fut

    async def close(self) -> None:
        """Finish every queued job, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def _wait(self, timeout: float | None) -> bool:
        self._wakeup.clear()
        try:
            if timeout is None:
                await self._wakeup.wait()
            else:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wait(None)
                continue
            # Wait for company only under concurrency: if the last batch was a lone request, a
            # lone request now is most likely a single sequential client, and waiting only adds latency.
            if self._queued < self.max_batch and self.max_wait_s > 0 and not self._closing and (
                self._last_batch > 1 or self._queued > 1
            ):
                deadline = loop.time() + self.max_wait_s
                while self._queued < self.max_batch and not self._closing:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or not await self._wait(remaining):
                        break
            batch = [self._pending.popleft()]
            n = len(batch[0].items)
            while self._pending and n + len(self._pending[0].items) <= self.max_batch:
                job = self._pending.popleft()
                batch.append(job)
                n += len(job.items)
            self._queued -= n
            self._last_batch = n
            self._metrics.queue_depth.labels(self.name).set(self._queued)
            try:
                await self._execute(batch)
            except Exception:  # pragma: no cover - _execute resolves every future itself
                logger.exception("batcher %s failed; continuing", self.name)

    async def _execute(self, batch: list[_Job]) -> None:
        by_k: dict[int, list[_Job]] = {}
        for job in batch:
            by_k.setdefault(job.k, []).append(job)
        for k, jobs in by_k.items():
            items = [it for job in jobs for it in job.items]
            try:
                results = await self._search(items, k)
            except Exception as exc:
                if len(jobs) == 1:
                    _resolve(jobs[0].future, exc=exc)
                    continue
                # One bad request must not fail its neighbours: retry each job on its own.
                logger.warning("batch of %d requests failed (%s); retrying them one by one", len(jobs), exc)
                for job in jobs:
                    try:
                        _resolve(job.future, await self._search(job.items, k))
                    except Exception as exc2:
                        _resolve(job.future, exc=exc2)
                continue
            start = 0
            for job in jobs:
                _resolve(job.future, results[start : start + len(job.items)])
                start += len(job.items)

    async def _search(self, items: list[Any], k: int) -> list[list[Any]]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        results = await loop.run_in_executor(self._executor, self._call, items, k)
        dt = time.perf_counter() - t0
        if not isinstance(results, list) or len(results) != len(items):
            got = len(results) if isinstance(results, list) else type(results).__name__
            raise RuntimeError(f"retriever returned {got} result lists for {len(items)} inputs")
        self._metrics.batch_size.labels(self.name).observe(len(items))
        self._metrics.batch_seconds.labels(self.name).observe(dt)
        self._ema_item_s = 0.8 * self._ema_item_s + 0.2 * (dt / max(1, len(items)))
        return results


def _resolve(fut: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():  # the client went away and the request was cancelled
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


__all__ = ["Batcher", "QueueFull"]
