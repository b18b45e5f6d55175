"""Redis faults against the real app: a restart costs no request, a frozen Redis never doubles a click.

Each test starts its own `redis-server` on a free port (service.launcher.LocalRedis) and kills,
restarts or freezes that one; the shared Redis is never touched.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from karma.config import ServeConfig
from service.app import create_app
from service.launcher import LocalRedis
from tests.helpers import run


def app_for(bundle_dir: Path, redis_url: str, **overrides: Any) -> Any:
    settings = {
        "bundle": bundle_dir,
        "intra_op_threads": 1,
        "access_log": False,
        "redis_url": redis_url,
        "redis_key_prefix": "fault:",
        "redis_timeout_s": 0.3,
        "bundle_root": Path("/"),
        **overrides,
    }
    return create_app(ServeConfig(**settings))


def first_items(bundle_dir: Path, n: int) -> list[str]:
    import pyarrow.parquet as pq

    return [str(i) for i in pq.read_table(bundle_dir / "items.parquet").column("item_id").to_pylist()[:n]]


def test_a_redis_restart_costs_no_request(bundle_dir: Path) -> None:
    """Every pooled connection breaks when Redis is killed; none of them may surface as a 503 afterwards."""
    items = first_items(bundle_dir, 4)

    async def scenario() -> None:
        with LocalRedis() as server:
            app = app_for(bundle_dir, server.url)
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://karma") as client:

                    async def burst() -> list[int]:
                        events = [
                            client.post("/events", json={"user_id": f"u{i}", "item_id": items[i % 4]})
                            for i in range(16)
                        ]
                        codes = [r.status_code for r in await asyncio.gather(*events)]
                        searches = [client.post("/search", json={"user_id": f"u{i}", "k": 3}) for i in range(16)]
                        return codes + [r.status_code for r in await asyncio.gather(*searches)]

                    assert await burst() == [200] * 32  # 16+ pooled connections now open
                    pool = app.state.svc.history.client.connection_pool
                    opened = len(pool._available_connections) + len(pool._in_use_connections)
                    assert opened >= 8, opened
                    server.kill()
                    server.start()  # same port, empty (no persistence): histories are gone, not errors
                    after = await burst()
                    assert after[:16] == [200] * 16, after  # events: stored on fresh connections
                    # searches by user: the first event of each user is back, so each has a history
                    assert after[16:] == [200] * 16, after
                    samples = (await client.get("/metrics")).text
                    assert 'karma_rejected_total{reason="redis_unavailable"} 0.0' in samples
                    assert "karma_redis_errors_total 0.0" in samples  # not even one failed command

    run(scenario())


def test_a_frozen_redis_with_retried_event_ids_records_each_click_once(bundle_dir: Path) -> None:
    """Clicks sent while Redis is frozen time out (503) although Redis may apply them later; retrying
    with the same event id after it thaws stores each exactly once, and nothing acknowledged is lost."""
    items = first_items(bundle_dir, 8)

    async def scenario() -> None:
        with LocalRedis() as server:
            app = app_for(bundle_dir, server.url, history_max_events=100)
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://karma") as client:
                    events = [{"user_id": "zoe", "item_id": items[i % 8], "event_id": f"e{i:03d}"} for i in range(24)]
                    acked: set[str] = set()
                    for event in events[:8]:
                        r = await client.post("/events", json=event)
                        assert r.status_code == 200
                        acked.add(event["event_id"])
                    server.freeze()
                    frozen = await asyncio.gather(*[client.post("/events", json=e) for e in events[8:16]])
                    assert {r.status_code for r in frozen} == {503}
                    server.thaw()
                    time.sleep(0.2)  # Redis now applies whatever it had read before the freeze
                    for event in events[8:]:  # the client retries everything it has no 200 for
                        for _ in range(3):
                            r = await client.post("/events", json=event)
                            if r.status_code == 200:
                                acked.add(event["event_id"])
                                break
                    assert len(acked) == 24
                    # And a careless client retrying acknowledged ones changes nothing.
                    again = [(await client.post("/events", json=e)).json()["duplicate"] for e in events[:8]]
                    assert again == [True] * 8
                    stored = [e["item_id"] for e in (await client.get("/users/zoe/history")).json()["items"]]
                    assert len(stored) == 24  # each click once: none lost, none doubled
                    assert redis.Redis.from_url(server.url).llen("fault:hist:zoe") == 24

    run(scenario())


def test_history_survives_a_reload_to_a_shorter_model_and_back(bundle_dir: Path, tmp_path: Path) -> None:
    """The stored bound is the service's: a bundle that reads fewer items never trims what is stored."""
    import json
    import shutil

    from karma.bundle import MANIFEST_FILE, write_manifest

    short = tmp_path / "short"
    shutil.copytree(bundle_dir, short)
    manifest = json.loads((short / MANIFEST_FILE).read_text())
    manifest["max_history"] = 5
    write_manifest(short, manifest)
    items = first_items(bundle_dir, 50)

    async def scenario() -> None:
        with LocalRedis() as server:
            app = app_for(bundle_dir, server.url, admin_api_key="k" * 32, history_max_events=40)
            admin = {"Authorization": f"Bearer {'k' * 32}"}
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://karma") as client:
                    for item in items[:30]:
                        r = await client.post("/events", json={"user_id": "ann", "item_id": item})
                        assert r.status_code == 200
                    before = [e["item_id"] for e in (await client.get("/users/ann/history")).json()["items"]]
                    assert before == items[:30]
                    r = await client.post("/admin/reload", json={"bundle": str(short)}, headers=admin)
                    assert r.status_code == 200, r.text
                    got = (await client.post("/search", json={"user_id": "ann", "k": 3})).json()
                    assert got["history_used"] == 5  # the short model reads the newest 5 ...
                    await client.post("/events", json={"user_id": "ann", "item_id": items[30]})
                    r = await client.post("/admin/reload", json={"bundle": str(bundle_dir)}, headers=admin)
                    assert r.status_code == 200, r.text
                    after = [e["item_id"] for e in (await client.get("/users/ann/history")).json()["items"]]
                    assert after == items[:31]  # ... and nothing was trimmed: the rollback sees all 31

    run(scenario())
