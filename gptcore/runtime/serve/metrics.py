"""Prometheus metrics of the HTTP server, in a registry of its own (two apps in one process keep apart)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gptcore.runtime.serve.access import route_path

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
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
        # The engines' (continuous batching), by model kind: `Observer` of gptcore.runtime.engine.
        self.ttft = Histogram(
            "gptcore_time_to_first_token_seconds",
            "from a request reaching the engine to its first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "gptcore_inter_token_seconds",
            "between a request's successive tokens",
            ["model"],
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.step_tokens = Histogram(
            "gptcore_engine_step_tokens",
            "tokens decoded per engine step",
            ["model"],
            buckets=STEP_TOKEN_BUCKETS,
            registry=r,
        )
        for name, what in (
            ("running", "sequences decoding in the engine's batch"),
            ("waiting", "requests waiting for a row of the engine"),
            ("kv_reserved_tokens", "cache slots the running sequences reserve"),
            ("kv_budget_tokens", "the engine's KV budget (--kv-tokens)"),
        ):
            setattr(self, name, Gauge(f"gptcore_engine_{name}", what, ["model"], registry=r))

    def watch(self, *admissions) -> None:
        """Queue depth and calls in flight read from the server's admissions at scrape time."""
        distinct = list(dict.fromkeys(admissions))
        self.queue_depth.set_function(lambda: sum(a.waiting for a in distinct))
        self.in_flight.set_function(lambda: sum(a.running for a in distinct))

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def token_gap(self, model: str, seconds: float) -> None:
        self.itl.labels(model).observe(seconds)

    def step(self, model: str, tokens: int, running: int, waiting: int, kv_reserved: int, kv_tokens: int) -> None:
        self.step_tokens.labels(model).observe(tokens)
        self.running.labels(model).set(running)
        self.waiting.labels(model).set(waiting)
        self.kv_reserved_tokens.labels(model).set(kv_reserved)
        self.kv_budget_tokens.labels(model).set(kv_tokens)

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
        path = route_path(scope)
        endpoint = path if path in self.endpoints else "other"
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
