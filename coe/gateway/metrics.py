"""Prometheus metrics of the gateway. /metrics exports these and the weight cache's
(coe.cache.metrics) from the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("coe_requests", "HTTP requests answered.", ["endpoint", "status"])
REQUEST_SECONDS = Histogram(
    "coe_request_seconds",
    "Seconds from request to the last byte of the response.",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS,
)
FIRST_TOKEN_SECONDS = Histogram(
    "coe_time_to_first_token_seconds",
    "Seconds from request to the first generated text of a streamed answer.",
    ["expert"],
    buckets=_LATENCY_BUCKETS,
)
TOKENS = Counter("coe_tokens", "Tokens processed.", ["expert", "kind"])
ROUTED = Counter(
    "coe_routed",
    "Chat requests by category and expert, and how the expert was chosen.",
    ["category", "expert", "how"],
)
RESPONSE_CACHE = Counter("coe_response_cache", "Response cache lookups.", ["result"])
RATE_LIMITED = Counter("coe_rate_limited", "Requests refused by a rate limit.", ["limit"])
STORE_HEALTHY = Gauge("coe_store_healthy", "1 while the store (Redis) answers.")
ENGINE_UNFINISHED = Gauge(
    "coe_engine_unfinished_requests",
    "Requests an in-process engine holds unfinished (0 when idle: none leaked by cancels).",
    ["engine"],
)
STORE_TROUBLE = Counter(
    "coe_store_trouble",
    "Requests that met the store unreachable or misconfigured, by what the gateway did: "
    "admitted_unchecked (on_store_error: open), refused (closed), misconfigured (503).",
    ["outcome"],
)
