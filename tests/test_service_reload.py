"""Hot reload (`POST /admin/reload`) against two real exported tiny bundles, real ORT/FAISS and a real Redis.

Bundle A and bundle B are trained from the same synthetic catalog (so the same item ids) with a
different seed and a different embedding width, so they answer differently and B's dims differ.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from karma.bundle import load_bundle, resign_bundle
from karma.config import config_to_yaml, load_config
from service.app import create_app
from service.launcher import free_port, wait_ready
from tests.helpers import (
    KARMA_BIN,
    REDIS_URL,
    assert_error,
    metric_samples,
    needs_redis,
    sample,
    serving,
    tiny_train_overrides,
)

KEY = "test-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _train_and_export(root: Path, extra: list[str]) -> Path:
    import torch

    from export.bundle_writer import export_checkpoint
    from training.trainer import CHECKPOINT_DIR, run_dir, train

    torch.set_num_threads(1)
    config = load_config(overrides=[*tiny_train_overrides(root), *extra], environ={})
    train(config, progress=False)
    out = root / "bundle"
    export_checkpoint(run_dir(config) / CHECKPOINT_DIR, out)
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    a = _train_and_export(tmp_path_factory.mktemp("reload-a"), [])
    b = _train_and_export(tmp_path_factory.mktemp("reload-b"), ["seed=1", "model.embed_dim=16"])
    la, lb = load_bundle(a, check_graphs=False), load_bundle(b, check_graphs=False)
    assert la.model_version != lb.model_version and la.manifest.dims.embed_dim != lb.manifest.dims.embed_dim
    return {
        "a": a,
        "b": b,
        "va": la.model_version,
        "vb": lb.model_version,
        "items": la.items["item_id"].astype(str).tolist(),
    }


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"karma-test-reload-{uuid.uuid4().hex[:12]}-"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{name}*"))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def bodies(items: list[str]) -> list[dict[str, Any]]:
    return [
        {"query": "red running shoes", "history": items[3:9], "k": 5},
        {"query": "", "history": items[100:120], "k": 5},
        {"query": "gift mug", "k": 5},
    ]


def model_info(samples: dict) -> dict[str, str]:
    [labels] = [dict(lab) for (n, lab), v in samples.items() if n == "karma_model_info" and v == 1]
    return labels


# ---- swap under load ------------------------------------------------------------------------------------


@needs_redis
def test_reload_under_concurrent_load_loses_no_request(bundles: dict, prefix: str) -> None:
    """16 clients search without pause while the bundle goes A -> B -> A: every request succeeds,
    each answer is wholly one bundle's, and every request that starts after a reload returned gets the new one."""
    va, vb = bundles["va"], bundles["vb"]
    work = bodies(bundles["items"])

    async def scenario() -> None:
        async with serving(bundles["a"], prefix, admin_api_key=KEY) as (_, client):
            log: list[tuple[float, float, int, str | None, int, tuple]] = []
            stop = asyncio.Event()

            async def client_loop(worker: int) -> None:
                i = worker
                while not stop.is_set():
                    body = work[i % len(work)]
                    started = time.perf_counter()
                    r = await client.post("/search", json=body)
                    got = r.json()
                    ids = tuple(x["item_id"] for x in got.get("items", ()))
                    log.append((started, time.perf_counter(), r.status_code, got.get("model_version"), i % 3, ids))
                    i += 1

            async def after(n: int) -> None:
                target = len(log) + n
                while len(log) < target:
                    await asyncio.sleep(0.001)

            async def reload(to: Path) -> tuple[float, float, httpx.Response]:
                began = time.perf_counter()
                r = await client.post("/admin/reload", json={"bundle": str(to)}, headers=AUTH)
                return began, time.perf_counter(), r

            workers = [asyncio.create_task(client_loop(w)) for w in range(16)]
            await after(40)
            b_began, b_done, rb = await reload(bundles["b"])
            await after(40)
            a_began, a_done, ra = await reload(bundles["a"])
            await after(max(40, 200 - len(log)))
            stop.set()
            await asyncio.gather(*workers)

            assert rb.status_code == 200, rb.text
            assert rb.json()["model_version"] == vb and rb.json()["previous_model_version"] == va
            assert rb.json()["embed_dim"] == 16
            assert ra.status_code == 200 and ra.json()["model_version"] == va, ra.text

            assert len(log) >= 200
            assert {e[2] for e in log} == {200}
            assert {e[3] for e in log} == {va, vb}  # both served; nothing else
            for started, ended, _, version, _, _ in log:
                if ended < b_began:
                    assert version == va
                elif b_done < started and ended < a_began:
                    assert version == vb
                elif started > a_done:
                    assert version == va
            assert any(b_done < e[0] and e[1] < a_began for e in log)  # B really served requests
            # Each answer is entirely one bundle's: the same body gives the same items per version.
            seen: dict[tuple[int, str], tuple] = {}
            for _, _, _, version, body_no, ids in log:
                assert seen.setdefault((body_no, version), ids) == ids
            assert seen[(0, va)] != seen[(0, vb)]

            samples = metric_samples((await client.get("/metrics")).text)
            assert sample(samples, "karma_reloads_total", outcome="success") == 2
            assert sample(samples, "karma_reload_duration_seconds_count") == 2
            assert model_info(samples)["model_version"] == va
            info = (await client.get("/info")).json()
            assert info["model_version"] == va and info["bundle"] == bundles["a"].name
            assert info["last_reload"]["outcome"] == "success"

    run(scenario())


@needs_redis
def test_requests_in_flight_finish_on_the_old_bundle(bundles: dict, prefix: str) -> None:
    """Jobs queued before the swap run on the old engine, later ones on the new (one batch split in two)."""
    va, vb = bundles["va"], bundles["vb"]
    body = bodies(bundles["items"])[0]

    async def scenario() -> None:
        async with serving(bundles["a"], prefix, admin_api_key=KEY, max_batch_wait_ms=0.0) as (app, client):
            before = (await client.post("/search", json=body)).json()
            batcher = app.state.svc.batcher
            gate = threading.Event()
            blocker = asyncio.create_task(batcher.run_in_worker(gate.wait))  # hold the encoder thread
            try:
                await asyncio.sleep(0.01)
                old = [asyncio.create_task(client.post("/search", json=body))]  # taken, waits for the encoder
                await asyncio.sleep(0.05)
                old += [asyncio.create_task(client.post("/search", json=body)) for _ in range(4)]
                await asyncio.sleep(0.05)
                assert batcher.depth == 4  # queued behind the held encoder, for engine A
                r = await client.post("/admin/reload", json={"bundle": str(bundles["b"])}, headers=AUTH)
                assert r.status_code == 200, r.text
                new = [asyncio.create_task(client.post("/search", json=body)) for _ in range(5)]
                await asyncio.sleep(0.05)
                assert batcher.depth == 9
            finally:
                gate.set()
            await blocker
            old_r = [(await t).json() for t in old]
            new_r = [(await t).json() for t in new]
            assert {x["model_version"] for x in old_r} == {va} and {x["model_version"] for x in new_r} == {vb}
            assert all(_same_ids(x, before) for x in old_r)  # computed by A, after B was installed
            assert not _same_ids(new_r[0], before)
            # The queue held 4 jobs for A and 5 for B when the encoder came free: collected together,
            # they ran as one batch per engine.
            assert [x["batch_size"] for x in old_r] == [1, 4, 4, 4, 4]
            assert [x["batch_size"] for x in new_r] == [5] * 5

    run(scenario())


def _same_ids(x: dict, y: dict) -> bool:
    return [i["item_id"] for i in x["items"]] == [i["item_id"] for i in y["items"]]


# ---- refusals ---------------------------------------------------------------------------------------------


def broken_bundles(good: Path, root: Path) -> list[tuple[str, Path, str]]:
    """(case, folder, text the error must contain)."""
    missing = shutil.copytree(good, root / "missing")
    (missing / "index.faiss").unlink()
    corrupt = shutil.copytree(good, root / "corrupt")
    data = bytearray((corrupt / "item_embeddings.npy").read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    (corrupt / "item_embeddings.npy").write_bytes(bytes(data))
    graph = shutil.copytree(good, root / "graph")
    (graph / "query_encoder.onnx").write_bytes(b"not an onnx graph" * 10)
    resign_bundle(graph)
    empty = root / "empty"
    empty.mkdir()
    return [
        ("missing file", missing, "missing file index.faiss"),
        ("bad checksum", corrupt, "item_embeddings.npy does not match its sha256"),
        ("unloadable graph, consistent manifest", graph, "query_encoder.onnx"),
        ("no manifest", empty, "no manifest.json"),
        ("no such folder", root / "nowhere", "not a folder"),
        ("a file, not a folder", good / "manifest.json", "not a folder"),
    ]


@needs_redis
def test_bad_bundle_is_refused_and_the_old_one_keeps_serving(bundles: dict, prefix: str, tmp_path: Path) -> None:
    va = bundles["va"]
    body = bodies(bundles["items"])[0]
    cases = broken_bundles(bundles["a"], tmp_path)

    async def scenario() -> None:
        async with serving(bundles["a"], prefix, admin_api_key=KEY) as (_, client):
            reference = (await client.post("/search", json=body)).json()
            for name, folder, expect in cases:
                r = await client.post("/admin/reload", json={"bundle": str(folder)}, headers=AUTH)
                err = assert_error(r, 422, "invalid_bundle", "bundle")
                assert expect in err["error"] and str(folder.resolve()).lstrip("/") in err["error"], (name, err)
                assert f"still serving {va}" in err["error"] and err["model_version"] == va
                r = await client.post("/search", json=body)
                assert r.status_code == 200 and r.json()["model_version"] == va, (name, r.text)
                assert _same_ids(r.json(), reference)

            for bad, field in (
                ({"bundle": ""}, "bundle"),
                ({"bundle": "a\x00b"}, "bundle"),
                ({"bundel": "x"}, "bundel"),
            ):
                r = await client.post("/admin/reload", json=bad, headers=AUTH)
                assert_error(r, 422, "validation_error", field)

            # Reading the served folder again (no body) is a successful no-op swap.
            r = await client.post("/admin/reload", headers=AUTH)
            assert r.status_code == 200 and r.json()["model_version"] == va, r.text

            # Two reloads at once: one runs, the other is told to wait.
            both = await asyncio.gather(
                client.post("/admin/reload", json={"bundle": str(bundles["a"])}, headers=AUTH),
                client.post("/admin/reload", json={"bundle": str(bundles["a"])}, headers=AUTH),
            )
            assert sorted(r.status_code for r in both) == [200, 409]
            assert_error(next(r for r in both if r.status_code == 409), 409, "reload_in_progress")

            samples = metric_samples((await client.get("/metrics")).text)
            assert sample(samples, "karma_reloads_total", outcome="rejected") == len(cases)
            assert sample(samples, "karma_reloads_total", outcome="success") == 2
            assert sample(samples, "karma_reloads_total", outcome="failed") == 0
            assert sample(samples, "karma_rejected_total", reason="invalid_bundle") == len(cases)
            assert model_info(samples)["model_version"] == va
            info = (await client.get("/info")).json()
            assert info["model_version"] == va and (await client.get("/readyz")).status_code == 200

    run(scenario())


# ---- auth -------------------------------------------------------------------------------------------------


@needs_redis
def test_admin_routes_refuse_without_the_right_key(bundles: dict, prefix: str) -> None:
    target = {"bundle": str(bundles["b"])}

    async def scenario() -> None:
        async with serving(bundles["a"], prefix) as (_, client):  # no key configured: disabled
            err = assert_error(await client.post("/admin/reload", json=target, headers=AUTH), 403, "admin_disabled")
            assert "KARMA_SERVE__ADMIN_API_KEY" in err["error"]
            assert (await client.get("/info")).json()["admin_enabled"] is False

        async with serving(bundles["a"], prefix, admin_api_key=KEY) as (_, client):
            refused = [
                {},
                {"Authorization": "Bearer wrong-key-0123456789"},
                {"Authorization": f"Bearer {KEY}x"},
                {"Authorization": f"Basic {KEY}"},
                {"Authorization": "Bearer"},
                {"Authorization": KEY},
            ]
            for headers in refused:
                r = await client.post("/admin/reload", json=target, headers=headers)
                assert_error(r, 401, "unauthorized")
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
            # Auth comes before body validation: no key and a bad body is still 401.
            assert_error(await client.post("/admin/reload", json={"bundle": 5}), 401, "unauthorized")
            assert_error(await client.get("/admin/reload", headers=AUTH), 405, "method_not_allowed")

            info = (await client.get("/info")).json()
            assert info["model_version"] == bundles["va"] and info["admin_enabled"] is True
            assert KEY not in json.dumps(info)
            samples = metric_samples((await client.get("/metrics")).text)
            assert sample(samples, "karma_rejected_total", reason="unauthorized") == len(refused) + 1
            assert sum(sample(samples, "karma_reloads_total", outcome=o) for o in ("success", "rejected")) == 0

            r = await client.post("/admin/reload", json=target, headers={"authorization": f"bearer {KEY}"})
            assert r.status_code == 200 and r.json()["model_version"] == bundles["vb"], r.text

    run(scenario())


def test_admin_key_comes_from_the_environment_verbatim_and_is_never_dumped(bundles: dict) -> None:
    digits = "0123456789012345678"  # YAML would read this as a number
    config = load_config(environ={"KARMA_SERVE__ADMIN_API_KEY": digits, "KARMA_SERVE__BUNDLE": str(bundles["a"])})
    assert config.serve.admin_api_key == digits and digits not in repr(config)
    assert digits not in config_to_yaml(config)
    assert load_config(environ={"KARMA_SERVE__ADMIN_API_KEY": ""}).serve.admin_api_key is None
    with pytest.raises(Exception, match="at least 16 characters") as caught:
        load_config(environ={"KARMA_SERVE__ADMIN_API_KEY": "short-key"})
    assert "short-key" not in str(caught.value)
    assert create_app(config).state.svc.config.admin_api_key == digits


# ---- a real server ------------------------------------------------------------------------------------------


@needs_redis
def test_karma_serve_reloads_while_200_concurrent_requests_run(bundles: dict, prefix: str) -> None:
    """Real uvicorn (`karma serve`, key from the environment), 200 requests fired at once with a reload among them."""
    va, vb = bundles["va"], bundles["vb"]
    port = free_port()
    env = {**os.environ, "KARMA_SERVE__ADMIN_API_KEY": KEY, "KARMA_SERVE__ACCESS_LOG": "false"}
    proc = subprocess.Popen(
        [KARMA_BIN, "serve", "--bundle", str(bundles["a"]), "--port", str(port),
         "--set", f"serve.redis_url={REDIS_URL}", "--set", f"serve.redis_key_prefix={prefix}",
         "--set", "serve.bundle_root=/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    work = bodies(bundles["items"])

    async def scenario() -> None:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
            searches = [asyncio.create_task(client.post("/search", json=work[i % 3])) for i in range(200)]
            await asyncio.sleep(0.05)
            reload = await client.post("/admin/reload", json={"bundle": str(bundles["b"])}, headers=AUTH)
            done = await asyncio.gather(*searches)
            assert reload.status_code == 200 and reload.json()["model_version"] == vb, reload.text
            assert [r.status_code for r in done] == [200] * 200
            assert {r.json()["model_version"] for r in done} <= {va, vb}
            after = [await client.post("/search", json=work[i % 3]) for i in range(5)]
            assert {r.json()["model_version"] for r in after} == {vb}
            assert (await client.get("/info")).json()["model_version"] == vb
            assert f'model_version="{vb}"' in (await client.get("/metrics")).text
            assert_error(await client.post("/admin/reload", json={}), 401, "unauthorized")

    try:
        wait_ready(proc, base, 60, lambda: proc.communicate()[1])
        run(scenario())
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "Traceback" not in stderr
