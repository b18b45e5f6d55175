"""Prometheus metrics, one registry per app (so several apps can live in one process, e.g. in tests)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import (
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase
from starlette.routing import Match, Mount
from starlette.types import Scope

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

disable_created_metrics()  # no `*_created` series: one per counter/histogram, and nothing reads them


class Metrics:
    """The service's metrics; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, open fds, ...
        r.register(PLATFORM_COLLECTOR)  # python_info
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
        self.admission_waiting = Gauge(
            "karma_admission_waiting_requests",
            "Requests waiting for a slot (over serve.max_concurrent_requests at work).",
            registry=r,
        )
        self.rejected = Counter(
            "karma_rejected_total",
            "Requests answered with an error, by reason (the error type).",
            ["reason"],
            registry=r,
        )
        self.redis_errors = Counter(
            "karma_redis_errors_total", "Redis commands that failed (down, timeout, protocol).", registry=r
        )
        self.degraded = Counter(
            "karma_degraded_searches_total",
            "By-user searches answered from the query alone because the stored history could not be read.",
            registry=r,
        )
        self.h_cache = Counter(
            "karma_h_cache_lookups_total",
            "h_t cache lookups (serve.h_cache_entries > 0) by result: hit (the encoder was skipped) or miss.",
            ["result"],
            registry=r,
        )
        self.items_changed = Counter(
            "karma_items_changed_total",
            "Items changed live by op: added (POST /items, new id), replaced (an id already served), deleted.",
            ["op"],
            registry=r,
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
        for reason in ("queue_full", "overloaded", "redis_unavailable", "validation_error", "payload_too_large"):
            self.rejected.labels(reason=reason)
        for outcome in ("success", "rejected", "failed"):
            self.reloads.labels(outcome=outcome)

    def track_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def track_admission(self, waiting: Callable[[], float]) -> None:
        self.admission_waiting.set_function(waiting)

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


# ---- reference documentation (docs/METRICS.md is this output: `python -m service.metrics`) ----------


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric as Prometheus sees it."""

    name: str  # the exposed name: counters carry `_total`
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...]  # histogram upper bounds, +Inf left out
    label_values: tuple[tuple[str, ...], ...]  # label sets created at start (dashboards read 0, not "no data")

    def samples(self) -> dict[str, set[str]]:
        """Sample name -> label names of the series this metric produces."""
        labels = set(self.labels)
        if self.kind == "histogram":
            return {f"{self.name}_bucket": labels | {"le"}, f"{self.name}_count": labels, f"{self.name}_sum": labels}
        return {self.name: labels}


def metric_specs(metrics: Metrics | None = None) -> list[MetricSpec]:
    """Every metric `Metrics` registers, in definition order."""
    specs = []
    for collector in vars(metrics or Metrics()).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        kind = collector._type
        buckets = tuple(b for b in getattr(collector, "_upper_bounds", ()) if b != float("inf"))
        specs.append(
            MetricSpec(
                name=collector._name + ("_total" if kind == "counter" else ""),
                kind=kind,
                help=collector._documentation,
                labels=tuple(collector._labelnames),
                buckets=buckets,
                label_values=tuple(collector._metrics) if collector._labelnames else (),
            )
        )
    return specs


def _bound(value: float, seconds: bool) -> str:
    if not seconds:
        return f"{value:g}"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if value >= scale:
            return f"{round(value / scale, 6):g} {unit}"
    return f"{value:g} s"


def metrics_reference() -> str:
    """The metrics as Markdown: name, type, labels (and the values created at start), help, buckets."""
    specs = metric_specs()
    lines = [
        "# Metrics reference",
        "",
        "Generated from `service/metrics.py` by `python -m service.metrics > docs/METRICS.md`; a test fails when",
        "this file and the code disagree. Every replica serves them at `GET /metrics` (Prometheus text format,",
        "one registry per app; no process or platform collectors). Histograms also expose `<name>_bucket`",
        "(label `le`), `<name>_sum` and `<name>_count`. Each /search response also carries its own stage",
        "timings, in `timings_ms` and in `X-<Stage>-Time` headers (ms).",
        "",
        "| metric | type | labels | help |",
        "|---|---|---|---|",
    ]
    for spec in specs:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "none"
        if spec.label_values:
            values = ", ".join("/".join(v) for v in spec.label_values)
            labels += f"; created at start: {values}"
        lines.append(f"| `{spec.name}` | {spec.kind} | {labels} | {spec.help} |")
    lines += ["", "## Histogram buckets (upper bounds)", ""]
    for spec in specs:
        if spec.kind == "histogram":
            seconds = spec.name.endswith("_seconds")
            bounds = ", ".join(_bound(b, seconds) for b in spec.buckets)
            lines.append(f"- `{spec.name}` ({len(spec.buckets)} + `+Inf`): {bounds}")
    return "\n".join(lines) + "\n"


class InFlight:
    """Counts requests being handled (shutdown waits for zero)."""

    def __init__(self) -> None:
        self.count = 0


def endpoint_label(scope: Scope) -> str:
    """The route template a request was for (`/users/{user_id}/history`), also when it was answered
    before routing (413, 408, overload 429s, a refused key) or by a mount (the docs' assets);
    "unmatched" only for paths no route serves (404s), so a scan cannot blow up label cardinality."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return path
    app = scope.get("app")
    # A mount rewrote root_path on its way down: match the path as the request sent it.
    probe = {
        "type": "http",
        "path": scope["path"],
        "root_path": scope.get("app_root_path", ""),
        "method": scope["method"],
    }
    for candidate in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = candidate.matches(probe)
        if match is not Match.NONE:  # PARTIAL: the path matches, the method does not (a 405)
            if isinstance(candidate, Mount):
                return candidate.path + "/{path}"
            return getattr(candidate, "path", None) or "unmatched"
    return "unmatched"


if __name__ == "__main__":
    print(metrics_reference(), end="")
