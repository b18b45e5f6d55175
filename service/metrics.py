"""Prometheus metrics, one registry per app (so several apps can live in one process, e.g. in tests)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# ~1.5x steps from 50 µs to 10 s: fine enough to read a p50 of a sub-millisecond stage.
SECONDS_BUCKETS = (
    50e-6, 75e-6, 100e-6, 150e-6, 200e-6, 300e-6, 500e-6, 750e-6,
    1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 7.5e-3,
    10e-3, 15e-3, 20e-3, 30e-3, 50e-3, 75e-3,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
STAGES = ("history", "featurize", "queue", "encode", "search", "total")

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The service's metrics; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "karma_request_duration_seconds",
            "Wall time of HTTP requests, by route and status.",
            ["endpoint", "method", "status"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "karma_stage_duration_seconds",
            "Per-stage time of /search requests (featurize/encode/search: the request's batch).",
            ["stage"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "karma_batch_size", "Requests encoded together in one micro-batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("karma_queue_depth", "Requests waiting for the encoder.", registry=r)
        self.in_flight = Gauge("karma_in_flight_requests", "HTTP requests being handled.", registry=r)
        self.rejected = Counter(
            "karma_rejected_total",
            "Requests answered with an error, by reason (the error type).",
            ["reason"],
            registry=r,
        )
        self.redis_errors = Counter(
            "karma_redis_errors_total", "Redis commands that failed (down, timeout, protocol).", registry=r
        )
        self.reloads = Counter(
            "karma_reloads_total",
            "Hot reloads (POST /admin/reload) by outcome: success, rejected (bad bundle), failed (other).",
            ["outcome"],
            registry=r,
        )
        self.reload_duration = Histogram(
            "karma_reload_duration_seconds",
            "Time to load, validate, probe and warm a bundle on reload (any outcome).",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
            registry=r,
        )
        self.model_info = Gauge(
            "karma_model_info",
            "The served bundle (value 1).",
            ["model_version", "embed_dim", "params", "flops_per_request", "provider", "index"],
            registry=r,
        )
        # Pre-create the label sets dashboards expect, so they read 0 instead of missing.
        self._stages = {stage: self.stage_duration.labels(stage=stage) for stage in STAGES}  # bound once
        for reason in ("queue_full", "redis_unavailable", "validation_error", "payload_too_large"):
            self.rejected.labels(reason=reason)
        for outcome in ("success", "rejected", "failed"):
            self.reloads.labels(outcome=outcome)

    def track_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def set_model(
        self, model_version: str, embed_dim: int, params: int, flops: int | None, provider: str, index: str
    ) -> None:
        self.model_info.clear()
        self.model_info.labels(
            model_version=model_version,
            embed_dim=str(embed_dim),
            params=str(params),
            flops_per_request="unknown" if flops is None else str(flops),
            provider=provider,
            index=index,
        ).set(1)

    def observe_stages(self, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self._stages[stage].observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
