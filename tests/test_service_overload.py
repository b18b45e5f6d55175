"""Load budgets and admission control: reloads that cannot eat the machine, batches within a token
budget, requests waiting for (or refused) a slot, slow clients timed out, shutdown answered typed.

Real tiny bundles, real ONNX Runtime, real uvicorn for the transport checks; the figures under
load are in `benchmarks/chaos_service.py` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from karma.bundle import load_bundle
from karma.config import ServeConfig
from karma.errors import KarmaError
from service.engine import Engine, request_tokens
from service.launcher import free_port, long_history_copy, wait_ready
from service.metrics import InFlight, Metrics
from service.middleware import Admission, ServiceMiddleware
from tests.helpers import KARMA_BIN, REDIS_URL, assert_error, metric_samples, sample, serving

KEY = "test-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def item_ids(bundle: Path) -> list[str]:
    return load_bundle(bundle, check_graphs=False, with_index=False).items["item_id"].astype(str).tolist()


# ---- the load budget -------------------------------------------------------------------------------------------


def test_a_request_over_the_token_budget_is_refused_before_anything_big_is_read(
    tiny_export: tuple[Path, Path], tmp_path: Path
) -> None:
    bundle = long_history_copy(tiny_export[1], 4096, tmp_path)
    with pytest.raises(KarmaError, match=r"4096 \+ max_query_tokens .* over serve.max_batch_tokens=1024"):
        Engine.prepare(bundle, ["CPUExecutionProvider"], 1, 32, max_batch_tokens=1024)


@pytest.mark.parametrize(
    ("sets", "why"),
    [
        ({"load_memory_budget_mb": 64, "max_batch_tokens": 65_536}, "over serve.load_memory_budget_mb=64"),
        ({"load_timeout_s": 0.001}, "over serve.load_timeout_s=0.001"),
    ],
)
def test_a_load_past_its_budget_is_stopped_and_the_old_bundle_keeps_serving(
    tiny_export: tuple[Path, Path], tmp_path: Path, sets: dict[str, Any], why: str
) -> None:
    good = tiny_export[1]
    heavy = long_history_copy(good, 1024, tmp_path)
    items = item_ids(good)
    prefix = f"karma-test-budget-{uuid.uuid4().hex[:8]}-"

    async def scenario() -> None:
        async with serving(good, prefix, admin_api_key=KEY) as (app, client):
            before = (await client.get("/info")).json()["model_version"]
            app.state.svc.config = app.state.svc.config.model_copy(update=sets)  # budgets for the reload only
            body = assert_error(await client.post("/admin/reload", json={"bundle": str(heavy)}, headers=AUTH), 422)
            assert body["type"] == "invalid_bundle" and why in body["error"], body
            found = await client.post("/search", json={"query": "gift", "history": items[:5], "k": 3})
            assert found.status_code == 200 and found.json()["model_version"] == before
            app.state.svc.config = app.state.svc.config.model_copy(update={"load_timeout_s": 120.0})
            again = await client.post("/admin/reload", json={"bundle": str(good)}, headers=AUTH)
            assert again.status_code == 200, again.text  # the reload lock was released

    asyncio.run(scenario())


def test_batches_keep_to_the_token_budget_and_rank_as_single_requests(tiny_export: tuple[Path, Path]) -> None:
    bundle = tiny_export[1]
    manifest = load_bundle(bundle, check_graphs=False, with_index=False).manifest
    full = request_tokens(manifest.max_history, manifest.max_query_tokens)
    items = item_ids(bundle)
    bodies = [{"query": f"q {i}", "history": items[i : i + manifest.max_history], "k": 5} for i in range(12)]
    prefix = f"karma-test-tokens-{uuid.uuid4().hex[:8]}-"

    async def scenario() -> None:
        async with serving(bundle, prefix, max_batch_tokens=2 * full, max_batch_wait_ms=50) as (_app, client):
            alone = [(await client.post("/search", json=b)).json() for b in bodies]
            together = await asyncio.gather(*(client.post("/search", json=b) for b in bodies))
            samples = metric_samples((await client.get("/metrics")).text)
        assert [r.status_code for r in together] == [200] * len(bodies)
        for a, t in zip(alone, together, strict=True):
            assert [r["item_id"] for r in a["items"]] == [r["item_id"] for r in t.json()["items"]]
        assert max(r.json()["batch_size"] for r in together) == 2  # batches formed, none over the budget
        total = sample(samples, "karma_batch_size_count")
        assert sample(samples, "karma_batch_size_bucket", le="2.0") == total > 0

    asyncio.run(scenario())


# ---- admission ---------------------------------------------------------------------------------------------------


def test_admission_hands_slots_to_waiters_in_order_and_refuses_past_the_room() -> None:
    async def scenario() -> None:
        gate = Admission(limit=2, max_waiting=2, max_wait_s=0.3)
        assert await gate.enter() and await gate.enter()
        third = asyncio.create_task(gate.enter())
        fourth = asyncio.create_task(gate.enter())
        await asyncio.sleep(0)
        assert gate.waiting == 2 and not await gate.enter()  # the room is full: refused at once
        gate.leave()
        assert await third and not fourth.done()  # the slot went to the longest waiter
        assert not await fourth  # nobody left within max_wait_s
        assert gate.waiting == 0 and gate.working == 2
        cancelled = asyncio.create_task(gate.enter())
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        gate.leave()
        gate.leave()
        assert gate.working == 0 and gate.waiting == 0  # no slot leaked

    asyncio.run(scenario())


def test_overloaded_requests_wait_then_get_a_typed_429_while_probes_pass() -> None:
    release = asyncio.Event()

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    gate = Admission(limit=1, max_waiting=1, max_wait_s=0.2)
    app = ServiceMiddleware(slow_app, Metrics(), InFlight(), 65_536, access=False, admission=gate, retry_after_s=3)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://karma") as client:
            busy = asyncio.create_task(client.post("/slow", json={}))
            await asyncio.sleep(0.05)
            began = time.perf_counter()
            waited = await client.post("/search", json={})
            assert time.perf_counter() - began >= 0.19  # it waited for a slot first
            body = assert_error(waited, 429, "overloaded")
            assert waited.headers["retry-after"] == "3" and "retry" in body["error"]
            again = await client.post("/search", json={})
            assert_error(again, 429, "overloaded")  # the pre-built answer is not altered by being sent
            assert "," not in again.headers["x-request-id"] != waited.headers["x-request-id"]
            assert (await client.get("/healthz")).status_code == 200  # probes are never held
            queued = asyncio.create_task(client.get("/info"))
            await asyncio.sleep(0.05)
            release.set()
            assert (await busy).status_code == 200 and (await queued).status_code == 200
            assert gate.working == 0

    asyncio.run(scenario())


# ---- a real server: slow clients and shutdown ---------------------------------------------------------------


def _start(bundle: Path, sets: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    prefix = f"karma-test-overload-{uuid.uuid4().hex[:8]}-"
    command = [KARMA_BIN, "serve", "--bundle", str(bundle), "--port", str(port),
               "--set", f"serve.redis_url={REDIS_URL}", "--set", f"serve.redis_key_prefix={prefix}",
               "--set", "serve.access_log=false", "--set", "serve.bundle_root=/",
               *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    env = {"KARMA_SERVE__ADMIN_API_KEY": KEY, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    wait_ready(proc, f"http://127.0.0.1:{port}", 60, lambda: proc.communicate()[1])
    return proc, port


def _read_all(sock: socket.socket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


def test_slow_heads_are_closed_and_slow_bodies_answered_408(tiny_export: tuple[Path, Path]) -> None:
    proc, port = _start(tiny_export[1], ["serve.header_timeout_s=1", "serve.body_timeout_s=1"])
    try:
        head = socket.create_connection(("127.0.0.1", port))
        head.sendall(b"POST /search HTTP/1.1\r\nhost: x\r\ncontent-ty")
        upload = socket.create_connection(("127.0.0.1", port))
        upload.sendall(
            b"POST /search HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 99\r\n\r\n{"
        )
        began = time.perf_counter()
        assert _read_all(head, 5) == b""  # closed without an answer
        assert time.perf_counter() - began < 4
        answer = _read_all(upload, 5)
        assert answer.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in answer, answer[:300]
        junk = socket.create_connection(("127.0.0.1", port))
        junk.sendall(b"GARBAGE\x00\x01 / HTTP/9\r\n\r\n")
        assert _read_all(junk, 5).startswith(b"HTTP/1.1 400")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert sample(metric_samples(metrics), "karma_rejected_total", reason="body_timeout") == 1
        assert sample(metric_samples(metrics), "karma_rejected_total", reason="bad_http_request") == 1
        assert sample(metric_samples(metrics), "karma_in_flight_requests") == 1  # only this scrape
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "Traceback" not in stderr


def test_sigterm_ends_the_server_promptly_with_typed_answers_mid_upload_and_mid_reload(
    tiny_export: tuple[Path, Path], tmp_path: Path
) -> None:
    heavy = long_history_copy(tiny_export[1], 4096, tmp_path)
    sets = ["serve.drain_timeout_s=1", "serve.body_timeout_s=60", "serve.max_batch_tokens=33000",
            "serve.load_memory_budget_mb=16384"]  # fmt: skip
    proc, port = _start(tiny_export[1], sets)
    uploads = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /search HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 50\r\n\r\n{")
        uploads.append(s)
    reload = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"bundle": str(heavy)}).encode()
    reload.sendall(
        b"POST /admin/reload HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {KEY}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    time.sleep(0.5)
    began = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    exited = time.perf_counter() - began
    assert exited < 1 + 4, exited  # the drain timeout, plus start-up of the shutdown
    for s in uploads:
        answer = _read_all(s, 2)
        assert answer.startswith(b"HTTP/1.1 503") and b'"shutting_down"' in answer, answer[:300]
    answered = _read_all(reload, 2)
    assert answered == b"" or answered.startswith((b"HTTP/1.1 503", b"HTTP/1.1 200")), answered[:300]
    assert "Traceback" not in stderr


def test_deeply_nested_json_is_named_as_such_not_as_bad_utf8(tiny_export: tuple[Path, Path]) -> None:
    async def scenario() -> None:
        async with serving(tiny_export[1], "karma-test-nesting-") as (_app, client):
            headers = {"content-type": "application/json"}
            deep = await client.post("/search", content=b"[" * 5000 + b"]" * 5000, headers=headers)
            assert "nested too deeply" in assert_error(deep, 422, "invalid_json", "body")["error"]
            bad = await client.post("/search", content=b'{"query": "\xff\xfe"}', headers=headers)
            assert "not valid UTF-8" in assert_error(bad, 422, "invalid_json", "body")["error"]

    asyncio.run(scenario())


def test_request_tokens_counts_history_query_and_the_emb_slot() -> None:
    assert request_tokens(20, 16) == 37
    engine = Engine.__new__(Engine)
    engine.max_history, engine.max_query_tokens = 20, 16
    from service.engine import Job

    job = Job("q", np.arange(50, dtype=np.int64), 10, np.zeros(0, dtype=np.int64))
    assert engine.request_tokens(job) == 37  # the model reads only the newest max_history
    empty = Job("q", np.zeros(0, dtype=np.int64), 10, np.zeros(0, dtype=np.int64))
    assert engine.request_tokens(empty) == 18  # an empty history is still padded to one position
    assert ServeConfig().max_batch_tokens >= 32 * 37  # the default fits a full default batch
