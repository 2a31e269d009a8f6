"""Prometheus metrics, and the health endpoints load balancers poll.

Each app has its own registry, so several apps in one process (tests, an
embedding service) do not mix their counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import falcon
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from dais_core.errors import DaisError
from dais_wsgi.bootstrap import Runtime

__all__ = ["Health", "Metrics", "MetricsResource", "Readiness"]


class _RuntimeCollector(Collector):
    """Read counters that adapters keep: key cache and degraded throttling."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        stats = getattr(self.runtime.keys, "stats", None)
        if stats is not None:
            cache = CounterMetricFamily(
                "dais_key_cache_lookups",
                "Key cache lookups by result",
                labels=["result"],
            )
            cache.add_metric(["hit"], stats.hits)
            cache.add_metric(["miss"], stats.misses)
            yield cache
        degraded = getattr(
            self.runtime.upload_throttle.state, "degraded_decisions", None
        )
        if degraded is not None:
            yield CounterMetricFamily(
                "dais_throttle_degraded_decisions",
                "Throttle decisions taken without the shared throttle state",
                value=degraded,
            )


class Metrics:
    """The counters and histograms of one app."""

    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dais_requests",
            "Requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.uploaded = Counter(
            "dais_uploaded_bytes", "Bytes of files published", registry=self.registry
        )
        self.throttle = Counter(
            "dais_throttle_decisions",
            "Throttle decisions, by policy and outcome",
            ["policy", "outcome"],
            registry=self.registry,
        )
        self.in_loop = Counter(
            "dais_webhook_calls_in_loop",
            "Webhook calls forwarded from the event loop, not a worker thread",
            registry=self.registry,
        )
        self.upstream = Histogram(
            "dais_upstream_latency_seconds",
            "Time for an upstream service to answer a forwarded call",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.registry.register(_RuntimeCollector(runtime))


class MetricsResource:
    """``GET /metrics`` in the Prometheus text format."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Expose every metric."""
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = generate_latest(self.metrics.registry)


class Health:
    """``GET /healthz``: the process is alive."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Answer 200."""
        resp.media = {"status": "ok"}

    on_head = on_get


class Readiness:
    """``GET /readyz``: the store, the throttle state and the storages answer.

    Args:
        checks: Named checks; each raises a domain error when not ready.
    """

    def __init__(self, checks: dict[str, Callable[[], Any]]) -> None:
        self.checks = checks

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Answer 200 when every check passes, else 503 with each result."""
        results = {}
        for name, check in self.checks.items():
            try:
                check()
                results[name] = "ok"
            except DaisError as exc:
                results[name] = exc.message
        ready = all(result == "ok" for result in results.values())
        resp.status = 200 if ready else 503
        resp.media = {"status": "ready" if ready else "unavailable", "checks": results}

    on_head = on_get
