"""OpenTelemetry tracing (off by default): one server span per request, a child span per stage.

With `serve.tracing=true` every request (except the probes and `/metrics`) gets a server span named
`<METHOD> <route>` — joined to the caller's trace when it sends a W3C `traceparent` header — and
each search or embedding input adds child spans `history`, `featurize`, `queue`, `encode` and
`search`, placed at the times they really ran (the batch stages are shared by every request of a
micro-batch, which each span says in `karma.batch_size`). Spans go to an OTLP/HTTP collector
(`serve.otlp_endpoint`, else the standard `OTEL_EXPORTER_OTLP_*` environment) through a batching
exporter, so the request path only appends to a queue.

Tracing off costs one `is None` check per request: the OpenTelemetry packages (in the serve extras)
are not even imported.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from karma.config import ServeConfig

log = logging.getLogger("karma.service")

UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})
_NS = 1_000_000_000


class Tracing:
    """A tracer and the clock offset that turns perf_counter readings into span timestamps."""

    def __init__(self, tracer: Any, provider: Any = None):
        self.tracer = tracer
        self.provider = provider  # shut down (flushed) with the app
        self._epoch_minus_perf_ns = time.time_ns() - time.perf_counter_ns()

    def ns(self, perf_seconds: float) -> int:
        """A `time.perf_counter()` reading as Unix nanoseconds (span start/end times)."""
        return int(perf_seconds * _NS) + self._epoch_minus_perf_ns

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()

    def stage_spans(self, prepared: Any, result: Any) -> None:
        """Child spans of the current request span for one input's stages, at their real times.

        `prepared` is a `service.searching.Prepared` (Redis read, id resolution), `result` the
        input's `JobResult` (queue wait and the batch's featurize/encode/search seconds).
        """
        from opentelemetry import trace

        parent = trace.get_current_span()
        if not parent.get_span_context().is_valid:
            return
        context = trace.set_span_in_context(parent)
        job = prepared.job
        attrs = {
            "karma.history_used": prepared.used,
            "karma.k": job.k,
            "karma.batch_size": result.batch_size,
        }
        marks = [("history", prepared.started, prepared.started + prepared.history_s)]
        batch_start = job.enqueued + result.seconds["queue"]
        marks.append(("queue", job.enqueued, batch_start))
        at = batch_start
        for stage in ("featurize", "encode", "search"):
            marks.append((stage, at, at + result.seconds[stage]))
            at += result.seconds[stage]
        for name, start, end in marks:
            span = self.tracer.start_span(name, context=context, start_time=self.ns(start), attributes=attrs)
            if name == "featurize":
                span.set_attribute("karma.resolve_ms", round(prepared.resolve_s * 1000, 4))
            span.end(end_time=self.ns(end))


def build_tracing(config: ServeConfig, exporter: Any = None) -> Tracing | None:
    """The service's Tracing, or None when `serve.tracing` is off. `exporter` replaces the OTLP one
    (tests pass an in-memory exporter)."""
    if not config.tracing:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
    except ImportError as exc:
        from karma.errors import KarmaError

        raise KarmaError(
            "serve.tracing=true needs the OpenTelemetry SDK (in the serve extras): pip install "
            f"opentelemetry-sdk opentelemetry-exporter-otlp-proto-http ({exc})"
        ) from None
    provider = TracerProvider(
        resource=Resource.create({"service.name": config.tracing_service_name}),
        sampler=ParentBasedTraceIdRatio(config.trace_sample_ratio),
    )
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint) if config.otlp_endpoint else OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    log.info("tracing on: OTLP to %s, sample ratio %s", config.otlp_endpoint or "OTEL_* env", config.trace_sample_ratio)
    return Tracing(provider.get_tracer("karma.service"), provider)


class TracingMiddleware:
    """The outermost layer while tracing is on: a server span around each request, W3C context in."""

    def __init__(self, app: ASGIApp, tracing: Tracing):
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED:
            await self.app(scope, receive, send)
            return
        from opentelemetry import propagate, trace

        from service.metrics import endpoint_label

        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        status = {"code": 0}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        with self.tracing.tracer.start_as_current_span(
            scope["method"],
            context=propagate.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "url.path": scope["path"]},
        ) as span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                route = endpoint_label(scope)
                span.update_name(f"{scope['method']} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status["code"])
                if status["code"] >= 500:
                    span.set_status(trace.StatusCode.ERROR)
