"""The search service against a real exported tiny bundle, real ONNX Runtime, real FAISS and a real Redis.

A tiny checkpoint is trained and exported once per module. Each test builds its own app
(`create_app`) with its own Redis key prefix (deleted afterwards), runs its lifespan and talks to
it through httpx's ASGI transport; one test runs `karma serve` (real uvicorn) in a subprocess, one
checks in a fresh interpreter that serving never imports torch.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from karma.config import ServeConfig
from service.app import create_app
from service.launcher import free_port, wait_ready
from tests.helpers import (
    KARMA_BIN,
    REDIS_URL,
    REPO,
    assert_error,
    assert_same_ranking,
    catalog,
    direct_search,
    metric_samples,
    needs_redis,
    run,
    sample,
    serving,
)

DEAD_REDIS_URL = "redis://127.0.0.1:1/0"


@needs_redis
def test_search_with_history_equals_direct_computation(bundle_dir: Path, reference: dict, prefix: str) -> None:
    items = catalog(reference)
    history = [items[3], items[17], items[250], items[999]]

    async def scenario() -> None:
        async with serving(bundle_dir, prefix) as (_, client):
            for query, k, exclude in (("red cotton tee", 10, True), ("", 25, False), ("earbuds", 1, True)):
                body = {"query": query, "history": history, "k": k, "exclude_history": exclude}
                r = await client.post("/search", json=body)
                assert r.status_code == 200, r.text
                got = r.json()
                assert_same_ranking(got, *direct_search(reference, query, history, k, exclude))
                assert got["model_version"] == reference["bundle"].model_version
                assert got["history_used"] == 4 and got["history_truncated"] == 0 and got["unknown_items"] == []
                assert set(got["timings_ms"]) == {"history", "featurize", "queue", "encode", "search", "total"}
                assert got["timings_ms"]["total"] >= got["timings_ms"]["encode"] > 0
                titles = reference["bundle"].items.set_index("item_id")["title"]
                assert all(i["title"] == titles[i["item_id"]] for i in got["items"])
                for header in ("X-Encode-Time", "X-Search-Time", "X-Total-Time", "X-Queue-Time", "X-Request-Id"):
                    assert header in r.headers
                assert float(r.headers["X-Encode-Time"]) == pytest.approx(got["timings_ms"]["encode"], abs=1e-3)
            # A query alone works too (no history at all).
            r = await client.post("/search", json={"query": "gift idea mug", "k": 5})
            assert r.status_code == 200 and r.json()["history_used"] == 0
            assert_same_ranking(r.json(), *direct_search(reference, "gift idea mug", [], 5, True))

    run(scenario())


@needs_redis
def test_search_by_user_id_reads_the_history_stored_by_events(bundle_dir: Path, reference: dict, prefix: str) -> None:
    items = catalog(reference)
    max_history = reference["bundle"].manifest.max_history
    clicks = [items[(7 * i) % len(items)] for i in range(max_history + 3)]

    kept = max_history + 2  # the service stores more than this model reads (serve.history_max_events)

    async def scenario() -> None:
        async with serving(bundle_dir, prefix, history_max_events=kept) as (_, client):
            for n, item in enumerate(clicks, 1):
                r = await client.post("/events", json={"user_id": "alice", "item_id": item, "timestamp": 1000.0 + n})
                assert r.status_code == 200, r.text
                assert r.json()["history_length"] == min(n, kept) and r.json()["duplicate"] is False
            r = await client.get("/users/alice/history")
            stored = r.json()
            assert [e["item_id"] for e in stored["items"]] == clicks[-kept:]  # newest N, oldest first
            assert stored["items"][-1]["timestamp"] == 1000.0 + len(clicks)
            assert stored["max_history"] == max_history and stored["max_events"] == kept
            # ISO timestamps and a default "now" are accepted too.
            r = await client.post(
                "/events", json={"user_id": "bob", "item_id": items[1], "timestamp": "2026-01-01T00:00:00Z"}
            )
            assert r.status_code == 200
            r = await client.get("/users/bob/history")
            assert r.json()["items"][0]["timestamp"] == 1767225600.0

            by_user = (await client.post("/search", json={"user_id": "alice", "query": "lamp", "k": 15})).json()
            explicit = (await client.post("/search", json={"query": "lamp", "history": clicks, "k": 15})).json()
            assert by_user["history_used"] == max_history and by_user["timings_ms"]["history"] > 0
            assert [i["item_id"] for i in by_user["items"]] == [i["item_id"] for i in explicit["items"]][:15]
            assert_same_ranking(by_user, *direct_search(reference, "lamp", clicks[-max_history:], 15, True))

            # A retried event id stores one click, however often it is sent.
            event = {"user_id": "dora", "item_id": items[3], "event_id": "click-0001"}
            first = (await client.post("/events", json=event)).json()
            again = [(await client.post("/events", json=event)).json() for _ in range(3)]
            assert first["duplicate"] is False and first["event_id"] == "click-0001"
            assert all(a["duplicate"] is True and a["history_length"] == 1 for a in again)
            other = (await client.post("/events", json={**event, "event_id": "click-0002"})).json()
            assert other["duplicate"] is False and other["history_length"] == 2
            no_id = [(await client.post("/events", json={"user_id": "dora", "item_id": items[3]})).json() for _ in "ab"]
            assert [a["history_length"] for a in no_id] == [3, 4] and no_id[0]["event_id"] != no_id[1]["event_id"]
            assert_error(await client.post("/events", json={**event, "event_id": ""}), 422, field="event_id")

            # A user without history and without a query has nothing to search with.
            assert_error(await client.post("/search", json={"user_id": "nobody"}), 422, "no_history", "query")
            r = await client.get("/users/nobody/history")
            assert r.status_code == 200 and r.json()["items"] == []
            r = await client.delete("/users/alice/history")
            assert r.json() == {"user_id": "alice", "deleted": True}
            assert (await client.get("/users/alice/history")).json()["items"] == []

    run(scenario())


@needs_redis
def test_exclude_history_removes_history_items(bundle_dir: Path, reference: dict, prefix: str) -> None:
    items = catalog(reference)
    n = len(items)
    history = [items[0], items[5], items[5], items[42]]  # a repeat counts once

    async def scenario() -> None:
        async with serving(bundle_dir, prefix) as (_, client):
            excluded = (await client.post("/search", json={"history": history, "k": 1000})).json()
            kept = (await client.post("/search", json={"history": history, "k": 1000, "exclude_history": False})).json()
            returned = [i["item_id"] for i in excluded["items"]]
            assert len(returned) == n - 3 and not set(history) & set(returned)
            assert len(kept["items"]) == n and set(history) <= {i["item_id"] for i in kept["items"]}
            # A small k still gets k results after the exclusions.
            small = (await client.post("/search", json={"history": history, "k": 7})).json()
            assert len(small["items"]) == 7 and not set(history) & {i["item_id"] for i in small["items"]}

    run(scenario())


@needs_redis
def test_unknown_and_overlong_histories_are_skipped_and_reported(
    bundle_dir: Path, reference: dict, prefix: str
) -> None:
    items = catalog(reference)
    max_history = reference["bundle"].manifest.max_history
    known = items[100 : 100 + max_history + 5]
    history = ["nope-1", *known[:3], "nope-2", "nope-1", *known[3:]]

    async def scenario() -> None:
        async with serving(bundle_dir, prefix) as (_, client):
            r = await client.post("/search", json={"query": "desk", "history": history, "k": 10})
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["unknown_items"] == ["nope-1", "nope-2"]
            assert got["history_used"] == max_history and got["history_truncated"] == 5
            assert_same_ranking(got, *direct_search_excluding(reference, "desk", known, max_history, 10))

    run(scenario())


def direct_search_excluding(reference: dict, query: str, known: list[str], max_history: int, k: int) -> tuple:
    """The newest max_history items feed the model; every known history item is excluded from results."""
    ids, scores = direct_search(reference, query, known[-max_history:], len(catalog(reference)), False)
    keep = [(i, s) for i, s in zip(ids, scores, strict=True) if i not in set(known)][:k]
    return [i for i, _ in keep], np.array([s for _, s in keep])


# ---- bad input --------------------------------------------------------------------------------------------


JSON = {"content-type": "application/json"}


@needs_redis
def test_every_bad_input_is_a_typed_4xx_never_5xx(bundle_dir: Path, reference: dict, prefix: str) -> None:
    items = catalog(reference)
    ok_history = [items[1], items[2]]

    async def chunks() -> AsyncIterator[bytes]:  # a chunked body (no Content-Length) over the limit
        yield b'{"query": "'
        for _ in range(80):
            yield b"a" * 1024
        yield b'"}'

    cases: list[tuple[str, str, dict[str, Any], int, str | None, str | None]] = [
        # (name, path, request kwargs, status, type, field)
        ("malformed json", "/search", {"content": b'{"query": "x", ', "headers": JSON}, 422, "invalid_json", "body"),
        ("not json at all", "/search", {"content": b"hello", "headers": JSON}, 422, "invalid_json", "body"),
        ("json array", "/search", {"json": [1, 2]}, 422, "validation_error", "body"),
        ("no body", "/search", {}, 422, "validation_error", "body"),
        ("invalid utf-8", "/search", {"content": b'{"query": "\xff\xfe"}', "headers": JSON}, 422, None, "body"),
        ("k not int", "/search", {"json": {"query": "x", "k": "ten"}}, 422, "validation_error", "k"),
        ("k float", "/search", {"json": {"query": "x", "k": 2.5}}, 422, "validation_error", "k"),
        ("k bool", "/search", {"json": {"query": "x", "k": True}}, 422, "validation_error", "k"),
        ("k zero", "/search", {"json": {"query": "x", "k": 0}}, 422, "validation_error", "k"),
        ("k 1001", "/search", {"json": {"query": "x", "k": 1001}}, 422, "validation_error", "k"),
        ("k negative", "/search", {"json": {"query": "x", "k": -3}}, 422, "validation_error", "k"),
        ("query number", "/search", {"json": {"query": 5}}, 422, "validation_error", "query"),
        ("history string", "/search", {"json": {"history": "i0000001"}}, 422, "validation_error", "history"),
        ("history of objects", "/search", {"json": {"history": [{"id": 1}]}}, 422, "validation_error", "history[0]"),
        (
            "history of null",
            "/search",
            {"json": {"query": "x", "history": [None]}},
            422,
            "validation_error",
            "history[0]",
        ),
        (
            "exclude not bool",
            "/search",
            {"json": {"query": "x", "exclude_history": "yes"}},
            422,
            None,
            "exclude_history",
        ),
        ("unknown field", "/search", {"json": {"query": "x", "histroy": []}}, 422, "validation_error", "histroy"),
        ("only unknown items", "/search", {"json": {"history": ["zz", "yy"]}}, 422, "unknown_items", "history"),
        ("empty history no query", "/search", {"json": {"history": []}}, 422, "validation_error", "query"),
        ("blank query no history", "/search", {"json": {"query": "   "}}, 422, "validation_error", "query"),
        ("empty object", "/search", {"json": {}}, 422, "validation_error", "query"),
        ("NUL in query", "/search", {"json": {"query": "red\x00shoes"}}, 422, "validation_error", "query"),
        ("bell in query", "/search", {"json": {"query": "a\x07b"}}, 422, "validation_error", "query"),
        ("lone surrogate", "/search", {"content": b'{"query": "\\ud83d"}', "headers": JSON}, 422, None, "query"),
        ("query too long", "/search", {"json": {"query": "x" * 600}}, 422, "validation_error", "query"),
        ("NUL in item id", "/search", {"json": {"history": ["i\x000"]}}, 422, "validation_error", "history"),
        ("user id too long", "/search", {"json": {"user_id": "u" * 300}}, 422, "validation_error", "user_id"),
        (
            "oversize body",
            "/search",
            {"json": {"query": "q", "history": ["i0000001"] * 8000}},
            413,
            "payload_too_large",
            "body",
        ),
        ("oversize chunked body", "/search", {"content": chunks(), "headers": JSON}, 413, "payload_too_large", "body"),
        (
            "event unknown item",
            "/events",
            {"json": {"user_id": "u1", "item_id": "nope"}},
            422,
            "unknown_items",
            "item_id",
        ),
        ("event no user", "/events", {"json": {"item_id": items[0]}}, 422, "validation_error", "user_id"),
        (
            "event bad timestamp",
            "/events",
            {"json": {"user_id": "u", "item_id": items[0], "timestamp": "soon"}},
            422,
            None,
            "timestamp",
        ),
        (
            "event negative timestamp",
            "/events",
            {"json": {"user_id": "u", "item_id": items[0], "timestamp": -1.0}},
            422,
            None,
            "timestamp",
        ),
        ("event blank user", "/events", {"json": {"user_id": " ", "item_id": items[0]}}, 422, None, "user_id"),
        ("event malformed", "/events", {"content": b"{", "headers": JSON}, 422, "invalid_json", "body"),
        ("history id too long", "/users/" + "u" * 300 + "/history", {"method": "GET"}, 422, None, "user_id"),
        ("history NUL id", "/users/a%00b/history", {"method": "GET"}, 422, None, "user_id"),
        ("no such route", "/nowhere", {"method": "GET"}, 404, "not_found", None),
        ("wrong method", "/search", {"method": "GET"}, 405, "method_not_allowed", None),
    ]

    async def scenario() -> None:
        async with serving(bundle_dir, prefix) as (_, client):
            for name, path, kwargs, status, type_, field in cases:
                kwargs = dict(kwargs)
                method = kwargs.pop("method", "POST")
                r = await client.request(method, path, **kwargs)
                try:
                    assert_error(r, status, type_, field)
                except AssertionError as exc:
                    raise AssertionError(f"case {name!r}: {exc}") from None

            # Valid but unusual input is fine: emoji and other scripts in a query, ints as item ids.
            for query in ("👟👟 running 🏃", "चाय mug", "Ｒｅｄ　ｓｈｏｅｓ", "\t tab\nnewline "):
                r = await client.post("/search", json={"query": query, "history": ok_history})
                assert r.status_code == 200, (query, r.text)
            r = await client.post("/search", json={"query": "x", "history": [12345]})
            assert r.status_code == 200 and r.json()["unknown_items"] == ["12345"]

            # Random junk never yields a 5xx.
            rng = random.Random(0)
            alphabet = [*'"{}[]:,1-\\', "k", "query", "history", "null", "\x00", "é", "🙂"]
            values = [None, True, -1, 0, 10**30, 1.5, "x", "", [], {}, ["i0000001"], [1, None], "\ud800"]
            for _ in range(150):
                if rng.random() < 0.5:
                    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
                    body = text.encode("utf-8", "surrogatepass")
                    r = await client.post("/search", content=body, headers=JSON)
                else:
                    fields = ["user_id", "query", "history", "k", "exclude_history", "extra"]
                    payload = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(0, 4))}
                    body = json.dumps(payload).encode()
                    r = await client.post("/search", content=body, headers=JSON)
                assert r.status_code < 500, (body, r.status_code, r.text)
                if r.status_code >= 400:
                    assert_error(r, r.status_code)

            samples = metric_samples((await client.get("/metrics")).text)
            assert sample(samples, "karma_rejected_total", reason="payload_too_large") == 2
            assert sample(samples, "karma_rejected_total", reason="internal_error") == 0
            assert sample(samples, "karma_request_duration_seconds_count", status="500") == 0

    run(scenario())


# ---- faults and load --------------------------------------------------------------------------------------


def test_redis_down_history_searches_still_work(bundle_dir: Path, reference: dict, prefix: str) -> None:
    items = catalog(reference)

    async def scenario() -> None:
        async with serving(bundle_dir, prefix, redis_url=DEAD_REDIS_URL, redis_timeout_s=0.2) as (_, client):
            r = await client.post("/search", json={"query": "shoes", "history": [items[1]], "k": 3})
            assert r.status_code == 200 and len(r.json()["items"]) == 3
            r = await client.post("/search", json={"query": "shoes", "k": 3})  # no history needed at all
            assert r.status_code == 200

            # By user with a query: the query alone, flagged degraded (the same ranking as a query-only search).
            r = await client.post("/search", json={"user_id": "u1", "query": "shoes", "k": 5})
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["degraded"] is True and "Redis" in got["degraded_reason"] and got["history_used"] == 0
            plain = (await client.post("/search", json={"query": "shoes", "k": 5})).json()
            assert plain["degraded"] is False and "degraded_reason" not in plain
            assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in plain["items"]]
            # By user without a query: nothing to rank with.
            r = await client.post("/search", json={"user_id": "u1"})
            body = assert_error(r, 503, "redis_unavailable")
            assert "Redis" in body["error"] and r.headers["Retry-After"] == "1"
            assert_error(
                await client.post("/events", json={"user_id": "u1", "item_id": items[0]}), 503, "redis_unavailable"
            )
            assert_error(await client.get("/users/u1/history"), 503, "redis_unavailable")

            # Readiness reflects what the replica serves (everything but stored histories); Redis is reported.
            r = await client.get("/readyz")
            assert r.status_code == 200, r.text
            assert r.json()["checks"]["redis"]["ok"] is False and r.json()["checks"]["encoder"]["ok"] is True
            assert (await client.get("/healthz")).status_code == 200

            samples = metric_samples((await client.get("/metrics")).text)
            assert sample(samples, "karma_redis_errors_total") >= 4
            assert sample(samples, "karma_rejected_total", reason="redis_unavailable") == 3
            assert sample(samples, "karma_degraded_searches_total") == 1

        # An operator who wants Redis-less replicas out of rotation says so.
        async with serving(
            bundle_dir, prefix, redis_url=DEAD_REDIS_URL, redis_timeout_s=0.2, ready_requires_redis=True
        ) as (_, client):
            body = assert_error(await client.get("/readyz"), 503, "not_ready")
            assert "redis" in body["error"].lower() and body["checks"]["redis"]["required"] is True

    run(scenario())


@needs_redis
def test_full_queue_answers_429_with_retry_after(bundle_dir: Path, reference: dict, prefix: str) -> None:
    items = catalog(reference)

    async def scenario() -> None:
        async with serving(bundle_dir, prefix, queue_size=1, max_batch_size=1, retry_after_s=2) as (_, client):
            body = {"query": "winter jacket", "history": items[:10], "k": 50}
            responses = await asyncio.gather(*(client.post("/search", json=body) for _ in range(40)))
            statuses = [r.status_code for r in responses]
            assert set(statuses) == {200, 429}, statuses
            rejected = [r for r in responses if r.status_code == 429]
            for r in rejected:
                assert_error(r, 429, "queue_full")
                assert r.headers["Retry-After"] == "2"
            samples = metric_samples((await client.get("/metrics")).text)
            assert sample(samples, "karma_rejected_total", reason="queue_full") == len(rejected)
            # With room again, the same request succeeds.
            assert (await client.post("/search", json=body)).status_code == 200

    run(scenario())


@needs_redis
def test_concurrent_requests_are_micro_batched_without_changing_results(
    bundle_dir: Path, reference: dict, prefix: str
) -> None:
    items = catalog(reference)
    rng = np.random.default_rng(0)
    queries = ["red tee", "", "wireless earbuds black", "mug", "linen cushion gift idea for mum", "x"]
    bodies = [
        {
            "query": queries[i % len(queries)],
            "history": [items[j] for j in rng.integers(0, len(items), int(rng.integers(0, 25)))],
            "k": int(rng.integers(1, 30)),
        }
        for i in range(24)
    ]
    bodies = [b if b["query"] or b["history"] else {**b, "query": "lamp"} for b in bodies]

    async def scenario() -> None:
        async with serving(bundle_dir, prefix, max_batch_wait_ms=20.0) as (_, client):
            alone = [(await client.post("/search", json=b)).json() for b in bodies]
            assert all(r["batch_size"] == 1 for r in alone)
            before = metric_samples((await client.get("/metrics")).text)
            together = await asyncio.gather(*(client.post("/search", json=b) for b in bodies))
            after = metric_samples((await client.get("/metrics")).text)

            assert all(r.status_code == 200 for r in together)
            assert max(r.json()["batch_size"] for r in together) > 1
            batches = sample(after, "karma_batch_size_count") - sample(before, "karma_batch_size_count")
            batched = sample(after, "karma_batch_size_sum") - sample(before, "karma_batch_size_sum")
            assert batched == len(bodies) and batches < batched  # some batch held more than one request
            for single, r in zip(alone, together, strict=True):  # padding inside a batch changes nothing
                got = r.json()
                assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in single["items"]]
                np.testing.assert_allclose(
                    [i["score"] for i in got["items"]], [i["score"] for i in single["items"]], atol=1e-5
                )

    run(scenario())


@needs_redis
def test_fast_path_and_the_fastapi_route_answer_alike(
    bundle_dir: Path, reference: dict, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Valid POST /search bodies take service.fastpath; a `+json` content type goes through FastAPI instead."""
    import service.fastpath

    items = catalog(reference)
    body = json.dumps({"query": "wool scarf", "history": [items[4], 12345, items[8]], "k": 7}).encode()
    fast_calls: list[int] = []
    real = service.fastpath.run_search

    async def counted(*args: Any) -> Any:
        fast_calls.append(1)
        return await real(*args)

    monkeypatch.setattr(service.fastpath, "run_search", counted)

    async def scenario() -> None:
        async with serving(bundle_dir, prefix) as (_, client):
            via_fast = await client.post("/search", content=body, headers=JSON)
            assert len(fast_calls) == 1
            via_fastapi = await client.post("/search", content=body, headers={"content-type": "application/x+json"})
            declined = await client.post("/search", content=b'{"query": "x", "k": 0}', headers=JSON)
            assert len(fast_calls) == 1  # FastAPI answered the +json request and the invalid one
            assert via_fast.status_code == via_fastapi.status_code == 200
            a, b = via_fast.json(), via_fastapi.json()
            assert a["items"] == b["items"] and a["unknown_items"] == b["unknown_items"] == ["12345"]
            assert set(via_fast.headers) == set(via_fastapi.headers)
            assert_error(declined, 422, "validation_error", "k")
            samples = metric_samples((await client.get("/metrics")).text)
            assert sample(samples, "karma_request_duration_seconds_count", endpoint="/search", status="200") == 2
            assert sample(samples, "karma_stage_duration_seconds_count", stage="total") == 2

    run(scenario())


@needs_redis
def test_metrics_are_present_and_increase(bundle_dir: Path, reference: dict, prefix: str) -> None:
    items = catalog(reference)

    async def scenario() -> None:
        async with serving(bundle_dir, prefix) as (_, client):
            r = await client.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            before = metric_samples(r.text)
            info = [lab for (n, lab), v in before.items() if n == "karma_model_info" and v == 1]
            assert len(info) == 1
            labels = dict(info[0])
            assert labels["model_version"] == reference["bundle"].model_version
            assert (
                labels["embed_dim"] == "32"
                and int(labels["params"]) > 0
                and labels["provider"] == "CPUExecutionProvider"
            )
            assert ("karma_queue_depth", ()) in before

            for i in range(5):
                assert (await client.post("/search", json={"query": f"q{i}", "history": items[:3]})).status_code == 200
            await client.post("/search", json={"k": 0})
            after = metric_samples((await client.get("/metrics")).text)

            def grew(name: str, by: float, **labels: str) -> None:
                assert sample(after, name, **labels) - sample(before, name, **labels) == by, (name, labels)

            grew("karma_request_duration_seconds_count", 5, endpoint="/search", status="200")
            grew("karma_request_duration_seconds_count", 1, endpoint="/search", status="422")
            for stage in ("history", "featurize", "queue", "encode", "search", "total"):
                grew("karma_stage_duration_seconds_count", 5, stage=stage)
            assert sample(after, "karma_stage_duration_seconds_sum", stage="encode") > 0
            grew("karma_batch_size_count", 5)
            grew("karma_rejected_total", 1, reason="validation_error")
            # Fine buckets: the smallest is 50 µs.
            les = {float(dict(lab)["le"]) for (n, lab) in after if n == "karma_stage_duration_seconds_bucket"}
            assert min(les) == 5e-5 and 10.0 in les

    run(scenario())


@needs_redis
def test_info_readyz_openapi_and_draining(bundle_dir: Path, reference: dict, prefix: str) -> None:
    manifest = reference["bundle"].manifest
    items = catalog(reference)

    async def scenario() -> None:
        app = create_app(ServeConfig(bundle=bundle_dir, access_log=False, redis_url=REDIS_URL, redis_key_prefix=prefix))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://karma") as client:
            async with app.router.lifespan_context(app):
                info = (await client.get("/info")).json()
                assert info["model_version"] == manifest.model_version and info["n_items"] == manifest.n_items
                assert info["dims"]["embed_dim"] == manifest.dims.embed_dim
                assert info["index"]["type"] == "flat" and info["providers"] == ["CPUExecutionProvider"]
                assert info["faiss_device"] == "auto" and info["index"]["device"] == "cpu"  # faiss-cpu: no GPU
                assert info["parameters"]["served"] > 0 and info["intra_op_threads"] == 1
                ready = (await client.get("/readyz")).json()
                assert ready["ready"] and ready["checks"]["encoder"]["ok"] and ready["checks"]["redis"]["ok"]
                schema = (await client.get("/openapi.json")).json()
                for path in ("/search", "/events", "/users/{user_id}/history", "/readyz", "/info", "/metrics"):
                    assert path in schema["paths"]
                assert schema["components"]["schemas"]["SearchRequest"]["examples"]
                assert "422" in schema["paths"]["/search"]["post"]["responses"]

                # Shutdown drains: requests already in flight finish with 200.
                body = {"query": "scarf", "history": items[:5]}
                pending = [asyncio.create_task(client.post("/search", json=body)) for _ in range(10)]
                await asyncio.sleep(0)
            done = await asyncio.gather(*pending)
            assert [r.status_code for r in done] == [200] * 10
            # After shutdown, new requests get a typed 503.
            assert_error(await client.post("/search", json=body), 503, "not_ready")

    run(scenario())


# ---- process-level -----------------------------------------------------------------------------------------


def test_serving_never_imports_torch(bundle_dir: Path) -> None:
    code = f"""
import asyncio, sys, httpx
from karma.config import ServeConfig
from service.app import create_app

async def main():
    app = create_app(ServeConfig(bundle={str(bundle_dir)!r}, redis_url={DEAD_REDIS_URL!r}, access_log=False))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://k") as c:
            r = await c.post("/search", json={{"query": "shoes", "k": 3}})
            assert r.status_code == 200, r.text
            await c.get("/readyz"); await c.get("/info"); await c.get("/metrics")

asyncio.run(main())
bad = sorted(m for m in sys.modules if m.split(".")[0] in {{"torch", "training", "export", "transformers"}})
print(bad)
sys.exit(1 if bad else 0)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_redis
def test_karma_serve_runs_uvicorn_and_stops_cleanly_on_sigterm(bundle_dir: Path, prefix: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [KARMA_BIN, "serve", "--bundle", str(bundle_dir), "--port", str(port),
         "--set", f"serve.redis_url={REDIS_URL}", "--set", f"serve.redis_key_prefix={prefix}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(proc, base, 60, lambda: proc.communicate()[1])
        r = httpx.post(f"{base}/search", json={"query": "shoes", "k": 4}, headers={"X-Request-Id": "req-123"})
        assert r.status_code == 200 and len(r.json()["items"]) == 4 and r.headers["x-request-id"] == "req-123"
        assert_error(httpx.post(f"{base}/search", content=b"{", headers=JSON), 422, "invalid_json")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (so the exit says SIGTERM).
    assert proc.returncode in (0, -signal.SIGTERM), stderr
    assert "Traceback" not in stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    access = [x for x in lines if x.get("logger") == "karma.service.access"]
    assert any(x["request_id"] == "req-123" and x["status"] == 200 for x in access)
    assert any(x["msg"] == "stopped" for x in lines)


class RedisProxy:
    """A TCP forwarder to the real Redis that the test can take down and bring back (same port)."""

    def __init__(self, target: str) -> None:
        parsed = httpx.URL(target.replace("redis://", "http://"))
        self.target = (parsed.host, parsed.port or 6379)
        self.db = parsed.path.strip("/") or "0"
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{self.db}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.target)
        self.writers |= {client_w, server_w}
        await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        self.writers.clear()
        await self.server.wait_closed()


@needs_redis
def test_service_recovers_by_itself_when_redis_comes_back(bundle_dir: Path, reference: dict, prefix: str) -> None:
    items = catalog(reference)

    async def scenario() -> None:
        proxy = RedisProxy(REDIS_URL)
        await proxy.up()
        async with serving(bundle_dir, prefix, redis_url=proxy.url, redis_timeout_s=0.3) as (_, client):
            event = {"user_id": "carol", "item_id": items[9]}
            assert (await client.post("/events", json=event)).status_code == 200
            assert (await client.get("/readyz")).status_code == 200

            await proxy.down()  # Redis "stops"
            assert_error(await client.post("/events", json=event), 503, "redis_unavailable")
            assert_error(await client.post("/search", json={"user_id": "carol"}), 503, "redis_unavailable")
            assert (await client.post("/search", json={"history": [items[9]]})).status_code == 200
            r = await client.get("/readyz")
            assert r.status_code == 200 and r.json()["checks"]["redis"]["ok"] is False

            await proxy.up()  # ... and comes back: no restart of the service needed
            r = await client.get("/readyz")
            assert r.status_code == 200 and r.json()["checks"]["redis"]["ok"] is True
            assert (await client.post("/events", json=event)).json()["history_length"] == 2
            r = await client.post("/search", json={"user_id": "carol", "k": 3})
            assert r.status_code == 200 and r.json()["history_used"] == 2
        await proxy.down()

    run(scenario())


def test_faiss_device_is_chosen_at_start_and_cuda_is_refused_without_a_gpu() -> None:
    """auto falls back to the CPU (this FAISS build sees no GPU); insisting on CUDA is one clear error."""
    from karma.errors import KarmaError
    from service.engine import select_faiss_device

    for index_type in ("flat", "hnsw", "ivfpq"):
        assert select_faiss_device("auto", index_type) == "cpu"
        assert select_faiss_device("cpu", index_type) == "cpu"
    with pytest.raises(KarmaError, match=r"serve\.faiss_device=cuda, but this FAISS build sees no GPU"):
        select_faiss_device("cuda", "flat")
