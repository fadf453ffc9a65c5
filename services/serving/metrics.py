"""Prometheus metrics of the model server, in one registry per app (tests build several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "invdpo_serving_request_duration_seconds",
            "Image generation requests, from arrival to answer (queueing included).",
            ["model", "status"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
            registry=self.registry,
        )
        self.batch_images = Histogram(
            "invdpo_serving_batch_images",
            "Images generated per pipeline call.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "invdpo_serving_queue_depth", "Requests waiting for a pipeline call.", ["model"], registry=self.registry
        )
        self.version_served = Gauge(
            "invdpo_serving_model_version", "The registered version being served (0: none yet).", ["model"],
            registry=self.registry,
        )  # fmt: skip
        self.version_held_back = Gauge(
            "invdpo_serving_alias_version_held_back",
            "The version the alias points at but that is not served (refused by the promotion gate, or failed to "
            "load; the reason is in the log and /healthz), 0 when none.",
            ["model"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "invdpo_serving_rejected", "Requests turned away before generating, by reason.", ["model", "reason"],
            registry=self.registry,
        )  # fmt: skip

    def add_model(self, name: str) -> None:
        """Show the model's gauges at 0 from the start (a labelled metric appears only once set)."""
        for gauge in (self.queue_depth, self.version_served, self.version_held_back):
            gauge.labels(name).set(0)
