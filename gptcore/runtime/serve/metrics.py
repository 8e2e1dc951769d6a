"""Prometheus metrics of the HTTP server, in a registry of its own (two apps in one process keep apart)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Statuses a request is turned away with before (or instead of) a model call, by reason.
REJECTED = {
    400: "bad_body",
    401: "unauthorized",
    404: "not_served",
    413: "too_large",
    422: "invalid",
    429: "overloaded",
    503: "not_ready",
}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "gptcore_http_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "gptcore_http_request_seconds",
            "time to the last byte of the answer (a stream's end)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("gptcore_generated_tokens", "tokens generated (streamed or not)", registry=r)
        self.errors = Counter(
            "gptcore_http_errors", "requests that failed on the server's side (5xx)", ["endpoint"], registry=r
        )
        self.rejected = Counter("gptcore_rejected_requests", "requests turned away, by reason", ["reason"], registry=r)
        self.queue_depth = Gauge("gptcore_queue_depth", "requests waiting for a model slot", registry=r)
        self.in_flight = Gauge(
            "gptcore_model_calls_in_flight", "model calls running (a stream counts until it ends)", registry=r
        )
        self.reloads = Counter(
            "gptcore_model_reloads", "registry alias moves acted on, by outcome", ["outcome"], registry=r
        )

    def watch(self, admission) -> None:
        """Queue depth and calls in flight read from `admission` at scrape time."""
        self.queue_depth.set_function(lambda: admission.waiting)
        self.in_flight.set_function(lambda: admission.running)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Instrument:
    """ASGI middleware: counts each request by endpoint and status and times it to its last byte.

    Paths outside `endpoints` count as "other", so a scan of random URLs cannot grow the label set.
    """

    def __init__(self, app, metrics: ServerMetrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status, start = 500, time.perf_counter()

        async def send_noting_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            m = self.metrics
            m.requests.labels(endpoint, str(status)).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - start)
            if status >= 500:
                m.errors.labels(endpoint).inc()
            if status in REJECTED:
                m.rejected.labels(REJECTED[status]).inc()
