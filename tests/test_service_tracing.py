"""OpenTelemetry tracing on the real app: a server span per request, stage spans at their real times."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from karma.config import ServeConfig
from service.app import create_app
from tests.helpers import run

STAGES = ["history", "queue", "featurize", "encode", "search"]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


async def traced(bundle: Path, exporter: InMemorySpanExporter, **overrides: Any) -> dict[str, Any]:
    config = ServeConfig(
        bundle=bundle, redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.2, access_log=False, **overrides
    )
    app = create_app(config, span_exporter=exporter)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://karma") as client:
            header = {"traceparent": f"00-{TRACE_ID}-{PARENT}-01"}
            return {
                "search": await client.post("/search", json={"query": "red shoes", "k": 3}, headers=header),
                "batch": await client.post("/search/batch", json={"inputs": [{"query": "a"}, {"query": "b"}]}),
                "health": await client.get("/healthz"),
                "bad": await client.post("/search", json={"k": 0}),
            }


def test_tracing_emits_a_server_span_and_stage_spans_joined_to_the_callers_trace(
    tiny_export: tuple[Path, Path],
) -> None:
    exporter = InMemorySpanExporter()
    got = run(traced(tiny_export[1], exporter, tracing=True))
    assert got["search"].status_code == 200 and got["batch"].status_code == 200
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.parent is None or s.name.startswith(("POST", "GET"))]
    names = sorted(s.name for s in servers)
    assert names == ["POST /search", "POST /search", "POST /search/batch"], names  # no span for /healthz
    search = next(s for s in servers if s.name == "POST /search" and s.attributes["http.response.status_code"] == 200)
    assert format(search.context.trace_id, "032x") == TRACE_ID  # joined the caller's trace
    assert format(search.parent.span_id, "016x") == PARENT
    children = [s for s in spans if s.parent is not None and s.parent.span_id == search.context.span_id]
    assert sorted(c.name for c in children) == sorted(STAGES)
    timings = got["search"].json()["timings_ms"]
    for child in children:
        assert search.start_time <= child.start_time <= child.end_time <= search.end_time, child.name
        ms = (child.end_time - child.start_time) / 1e6
        if child.name == "featurize":  # the response's featurize also counts the id resolution, an attribute here
            ms += child.attributes["karma.resolve_ms"]
        assert ms == pytest.approx(timings[child.name], abs=0.005), child.name
    batch = next(s for s in servers if s.name == "POST /search/batch")
    batch_children = [s for s in spans if s.parent is not None and s.parent.span_id == batch.context.span_id]
    assert sorted(c.name for c in batch_children) == sorted(STAGES * 2)  # one set per input
    bad = next(s for s in servers if s.attributes["http.response.status_code"] == 422)
    assert not [s for s in spans if s.parent is not None and s.parent.span_id == bad.context.span_id]


def test_tracing_off_by_default_records_nothing(tiny_export: tuple[Path, Path]) -> None:
    exporter = InMemorySpanExporter()
    got = run(traced(tiny_export[1], exporter))
    assert got["search"].status_code == 200
    assert exporter.get_finished_spans() == ()
