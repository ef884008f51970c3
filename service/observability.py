"""Prometheus metrics (GET /metrics): queue depth, running, finished by status, request latency.

Experiment counts are read from the database at scrape time, so every replica reports the same
numbers and they survive restarts; request latency is this replica's own histogram.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from service import store
from service.states import FINAL

log = logging.getLogger(__name__)


class QueueCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session], ray_up: Callable[[], bool]):
        self.sessions = sessions
        self.ray_up = ray_up

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("cdsp_database_up", "1 when the database answered this scrape")
        try:
            with self.sessions() as s:
                counts = store.counts(s)
        except Exception as exc:  # a scrape must still answer while the database is down
            log.warning("metrics: database error: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("cdsp_queue_depth", "Experiments waiting in the queue", value=counts["queued"])
        yield GaugeMetricFamily(
            "cdsp_experiments_running",
            "Experiments dispatched to Ray (dispatching + running)",
            value=counts["dispatching"] + counts["running"],
        )
        finished = GaugeMetricFamily("cdsp_experiments_finished", "Finished experiments by status", labels=["status"])
        for status in sorted(FINAL):
            finished.add_metric([str(status)], counts[str(status)])
        yield finished
        by_status = GaugeMetricFamily("cdsp_experiments", "Experiments by status", labels=["status"])
        for name, n in counts.items():
            by_status.add_metric([name], n)
        yield by_status
        yield GaugeMetricFamily("cdsp_ray_up", "1 when the Ray dashboard answered", value=int(self.ray_up()))


def make_registry(sessions: sessionmaker[Session], ray_up: Callable[[], bool]) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    registry.register(QueueCollector(sessions, ray_up))
    latency = Histogram(
        "cdsp_http_request_duration_seconds",
        "HTTP request latency by route template",
        ["method", "route", "status"],
        registry=registry,
    )
    return registry, latency


class LatencyMiddleware:
    """Pure ASGI middleware: time from request to the last body byte, labelled by route template."""

    def __init__(self, app: Any, histogram: Histogram):
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "<unmatched>"
            self.histogram.labels(scope["method"], route, str(status)).observe(time.perf_counter() - start)
