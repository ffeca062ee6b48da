"""Prometheus metrics of the chat API (``GET /metrics``), on a registry of the app's own.

Requests by route and status are counted by the retrieval service's ASGI middleware
(:class:`medrwr.retrieval.service.metrics.MetricsMiddleware`, which reads ``requests`` and ``latency`` here).
"""

from __future__ import annotations


class APIMetrics:
    """Requests by status, queue depth, batch size, time to first token, tokens/s, retrievals per request."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry(auto_describe=True)
        secs = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.requests = Counter("medrwr_api_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("medrwr_api_request_seconds", "Request latency by route", ["route"], registry=r,
                                 buckets=secs)
        self.queue_depth = Gauge("medrwr_api_queue_depth", "Chat requests waiting for an engine batch", registry=r)
        self.batch_size = Histogram("medrwr_api_batch_size", "Rows per engine batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.ttft = Histogram("medrwr_api_time_to_first_token_seconds", "Time from request to its first streamed token",
                              registry=r, buckets=secs)
        self.tokens_per_s = Histogram("medrwr_api_tokens_per_second", "Model tokens per second of each request",
                                      registry=r, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000))
        self.retrievals = Histogram("medrwr_api_retrievals_per_request", "Retrieval rounds per rollout", registry=r,
                                    buckets=(0, 1, 2, 3, 4, 5, 8))
        self.model_tokens = Counter("medrwr_api_model_tokens", "Model-written completion tokens", registry=r)
        self.inserted_tokens = Counter("medrwr_api_inserted_tokens", "Inserted (retrieved) tokens", registry=r)
        self.rejected = Counter("medrwr_api_rejected", "Requests refused: queue full or draining", ["reason"],
                                registry=r)
        self.cancelled = Counter("medrwr_api_cancelled", "Requests whose client went away before the end", registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


__all__ = ["APIMetrics"]
