"""Prometheus metrics: request latency by route, and jobs by status read from the database at scrape time."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from services.jobs import jobstore
from services.jobs.models import STATUSES

log = logging.getLogger(__name__)


class JobsByStatus(Collector):
    def __init__(self, session_factory: sessionmaker[Session]):
        self.session_factory = session_factory

    def describe(self) -> Iterator[Metric]:
        # Without describe(), registering the collector would call collect() and query the database.
        yield GaugeMetricFamily("invdpo_jobs", "Jobs by status.", labels=["status"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("invdpo_jobs", "Jobs by status.", labels=["status"])
        try:
            with self.session_factory() as session:
                counts = jobstore.count_jobs_by_status(session)
        except Exception:
            log.warning("cannot count jobs for /metrics", exc_info=True)
            return
        for status in STATUSES:
            family.add_metric([status], counts.get(status, 0))
        yield family


class Metrics:
    """One registry per app (tests build several apps in one process)."""

    def __init__(self, session_factory: sessionmaker[Session]):
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "invdpo_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["method", "route", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.jobs_enqueued = Counter(
            "invdpo_reconciler_redispatched", "Jobs the reconciler sent again.", ["reason"], registry=self.registry
        )
        self.registry.register(JobsByStatus(session_factory))
