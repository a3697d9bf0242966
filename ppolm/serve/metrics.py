"""`GET /metrics` of `ppolm serve` in Prometheus text format (prometheus_client), one registry per app.

Series (all prefixed `ppolm_serve_`, listed in docs/metrics.md):
requests_total{route,status}, request_latency_seconds{route} (histogram; a stream ends at its last chunk),
completion_tokens_total, prompt_tokens_total, queue_depth, running_rows, decode_steps_total, prefills_total.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ppolm.serve.request import EngineStats

PREFIX = "ppolm_serve"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KNOWN_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"})
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _EngineCollector(Collector):
    """Reads the engine's counters at scrape time, so the worker thread's hot loop does no metric calls."""

    def __init__(self, stats: EngineStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator:
        s = self.stats
        yield CounterMetricFamily(f"{PREFIX}_completion_tokens", "completion tokens generated", value=s.tokens)
        yield CounterMetricFamily(f"{PREFIX}_decode_steps", "decode steps of the running batch", value=s.steps)
        yield CounterMetricFamily(f"{PREFIX}_prefills", "prefill passes (admissions into the batch)", value=s.batches)
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "requests waiting for a place in the batch", value=s.queued)
        yield GaugeMetricFamily(f"{PREFIX}_running_rows", "rows decoding now", value=s.running)


class ServeMetrics:
    """The app's registry: request counters and latencies (fed by the limits middleware) plus engine gauges."""

    def __init__(self, stats: EngineStats) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_request_latency_seconds", "time from request to last byte", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of generation requests",
                                     registry=self.registry)
        self.registry.register(_EngineCollector(stats))

    def observe(self, path: str, status: int, seconds: float) -> None:
        """Count one finished request; unknown paths share one label so scanners cannot blow up the series."""
        route = path if path in KNOWN_ROUTES else "other"
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
