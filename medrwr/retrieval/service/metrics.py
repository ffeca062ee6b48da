"""Prometheus metrics of the retrieval service, and the ASGI middleware that counts requests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Metrics:
    """Prometheus metrics on a registry of this app's own (several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "medrwr_retrieval_requests", "HTTP requests by route, method and status", ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "medrwr_retrieval_request_seconds", "Request latency by route", ["route"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.queue_depth = Gauge(
            "medrwr_retrieval_queue_depth", "Queries (or images) waiting for a batch", ["batcher"], registry=r
        )
        self.batch_size = Histogram(
            "medrwr_retrieval_batch_size", "Items per retriever call", ["batcher"], registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.batch_seconds = Histogram(
            "medrwr_retrieval_batch_seconds", "Seconds per retriever call", ["batcher"], registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.queries = Counter("medrwr_retrieval_queries", "Queries answered, by mode", ["mode"], registry=r)
        self.rejected = Counter(
            "medrwr_retrieval_rejected", "Requests turned away because the queue was full", ["batcher"], registry=r
        )

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI: count requests by route template + status and time them (cheap, no BaseHTTPMiddleware)."""

    def __init__(self, app: Any, get_metrics: Callable[[], Metrics | None]):
        self.app = app
        self._get_metrics = get_metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics = self._get_metrics()
            if metrics is not None:
                route = scope.get("route")
                label = getattr(route, "path", None) or "unmatched"
                metrics.requests.labels(label, scope.get("method", ""), str(status[0])).inc()
                metrics.latency.labels(label).observe(time.perf_counter() - t0)


__all__ = ["Metrics", "MetricsMiddleware"]
