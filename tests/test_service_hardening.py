"""Small hardening checks: credentials never shown, bundles with non-finite vectors refused, HEAD /healthz."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from karma.bundle import ITEM_EMBEDDINGS_FILE, load_bundle, resign_bundle
from karma.config import ServeConfig
from karma.errors import KarmaError
from service.app import create_app
from service.history import mask_url


def test_text_rules_refuse_exactly_control_characters_and_surrogates() -> None:
    """check_text's one-regex fast path refuses exactly what its per-character rule (Unicode categories Cc
    but tab/newline/CR, and Cs) refuses, over every code point; the message still names the character."""
    import sys
    import unicodedata

    from service.schemas import check_id, check_text

    def refused(ch: str) -> bool:
        try:
            check_text(f"ok{ch}ok", "history[3]")
        except ValueError as exc:
            assert f"U+{ord(ch):04X}" in str(exc) and "history[3]" in str(exc)
            return True
        return False

    def rule(ch: str) -> bool:
        category = unicodedata.category(ch)
        return category == "Cs" or (category == "Cc" and ch not in "\t\n\r")

    assert [cp for cp in range(sys.maxunicode + 1) if refused(chr(cp)) != rule(chr(cp))] == []
    assert check_id("item-7 ü 東京", "id") == "item-7 ü 東京"
    with pytest.raises(ValueError, match="blank"):
        check_id(" \t", "id")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://app:s3cret@cache:6379/0", "redis://app:***@cache:6379/0"),
        ("rediss://tok3n@cache:6380/1", "rediss://***@cache:6380/1"),
        ("redis://cache:6379/0?password=s3cret&db=2", "redis://cache:6379/0?password=***&db=2"),
        ("unix:///run/redis.sock?Password=s3cret", "unix:///run/redis.sock?Password=***"),
    ],
)
def test_redis_urls_are_shown_without_credentials(url: str, shown: str) -> None:
    assert mask_url(url) == shown
    assert "s3cret" not in mask_url(url) and "tok3n" not in mask_url(url)


@pytest.mark.parametrize("bad", ["nan", "zero"])
def test_bundles_with_unusable_item_vectors_are_refused(
    tiny_export: tuple[Path, Path], tmp_path: Path, bad: str
) -> None:
    bundle = shutil.copytree(tiny_export[1], tmp_path / "bundle")
    embeddings = np.load(bundle / ITEM_EMBEDDINGS_FILE)
    embeddings[3] = np.nan if bad == "nan" else 0.0
    np.save(bundle / ITEM_EMBEDDINGS_FILE, embeddings)
    resign_bundle(bundle)  # checksums agree: only the values are wrong
    with pytest.raises(KarmaError, match="NaN or infinite" if bad == "nan" else "all-zero rows"):
        load_bundle(bundle)


def test_info_shows_no_paths_or_passwords_and_head_healthz_works(tiny_export: tuple[Path, Path]) -> None:
    bundle = tiny_export[1]
    url = "redis://:hunter2secret@127.0.0.1:1/0?password=hunter2secret"
    app = create_app(ServeConfig(bundle=bundle, redis_url=url, redis_timeout_s=0.2, access_log=False))

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://karma") as client:
                info = (await client.get("/info")).text
                assert "hunter2secret" not in info and str(bundle.parent) not in info
                assert json.loads(info)["bundle"] == bundle.name
                head = await client.head("/healthz")
                assert head.status_code == 200 and head.content == b""

    asyncio.run(scenario())


def test_a_batch_with_heavy_k_searches_per_k_group_and_ranks_like_single_requests(
    tiny_export: tuple[Path, Path],
) -> None:
    from service.engine import Engine, Job

    engine = Engine.load(tiny_export[1], ["CPUExecutionProvider"], 1)
    rng = np.random.default_rng(0)
    jobs = [
        Job(
            query=f"query {i}",
            history=rng.integers(0, engine.n_items, size=int(rng.integers(0, 6))).astype(np.int64),
            k=k,
            exclude=np.unique(rng.integers(0, engine.n_items, size=3)).astype(np.int64),
        )
        for i, k in enumerate([10, 1000, 3, 10, 300, 1, 1000, 40])
    ]
    groups = engine.search_groups(jobs)
    by_job = {int(i): k for members, k in groups for i in members}
    assert sorted(by_job) == list(range(len(jobs)))  # every job searched exactly once
    assert by_job[0] <= 16 and by_job[5] <= 16 and by_job[1] == min(engine.n_items, 1003)  # light never asks for 1000
    assert len(groups) >= 3
    batched = engine.run_batch(jobs)
    for job, got in zip(jobs, batched, strict=True):
        alone = engine.run_batch([job])[0]
        assert len(got.rows) == min(job.k, engine.n_items - len(job.exclude))
        np.testing.assert_array_equal(got.rows, alone.rows)
        np.testing.assert_allclose(got.scores, alone.scores, rtol=1e-5, atol=1e-6)
        assert not np.isin(got.rows, job.exclude).any()


def test_reload_is_confined_to_the_bundle_root_and_answers_without_server_paths(
    tiny_export: tuple[Path, Path], tmp_path: Path
) -> None:
    root = tmp_path / "models"
    served = shutil.copytree(tiny_export[1], root / "v1")
    shutil.copytree(tiny_export[1], root / "v2")
    outside = shutil.copytree(tiny_export[1], tmp_path / "elsewhere")
    key = "test-admin-key-0123456789"
    auth = {"Authorization": f"Bearer {key}"}
    config = ServeConfig(bundle=served, admin_api_key=key, redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.2)
    app = create_app(config.model_copy(update={"access_log": False}))

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://karma") as client:
                for bad in (str(outside), "../elsewhere", "/etc", "v1/../../elsewhere"):
                    r = await client.post("/admin/reload", json={"bundle": bad}, headers=auth)
                    assert r.status_code == 422 and r.json()["type"] == "invalid_bundle", r.text
                    assert "bundle root" in r.json()["error"] and str(tmp_path) not in r.text
                missing = await client.post("/admin/reload", json={"bundle": "nope"}, headers=auth)
                assert missing.status_code == 422 and str(tmp_path) not in missing.text, missing.text
                ok = await client.post("/admin/reload", json={"bundle": "v2"}, headers=auth)
                assert ok.status_code == 200 and ok.json()["bundle"] == "v2", ok.text
                again = await client.post("/admin/reload", json={"bundle": str(root / "v1")}, headers=auth)
                assert again.status_code == 200 and again.json()["bundle"] == "v1", again.text
                assert (await client.get("/info")).json()["last_reload"]["bundle"] == "v1"

    asyncio.run(scenario())


@pytest.mark.parametrize("docs", [True, False])
def test_docs_are_self_hosted_or_off(tiny_export: tuple[Path, Path], docs: bool) -> None:
    config = ServeConfig(bundle=tiny_export[1], redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.2, docs=docs)
    app = create_app(config.model_copy(update={"access_log": False}))

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://karma") as client:
                page, schema = await client.get("/docs"), await client.get("/openapi.json")
                if not docs:
                    assert page.status_code == 404 and schema.status_code == 404
                    return
                assert page.status_code == 200 and schema.status_code == 200
                assert "cdn" not in page.text.lower() and "/docs/static/swagger-ui-bundle.js" in page.text
                js = await client.get("/docs/static/swagger-ui-bundle.js")
                assert js.status_code == 200 and len(js.content) > 100_000
                assert (await client.get("/redoc")).status_code == 404  # ReDoc would need a CDN

    asyncio.run(scenario())


def test_api_key_guards_public_routes_but_not_probes_docs_or_cors_preflight(tiny_export: tuple[Path, Path]) -> None:
    key = "public-api-key-0123456789"
    config = ServeConfig(
        bundle=tiny_export[1],
        redis_url="redis://127.0.0.1:1/0",
        redis_timeout_s=0.2,
        api_key=key,
        cors_origins=["https://app.example.com"],
        access_log=False,
    )
    app = create_app(config)
    search = {"query": "gift mug", "k": 3}

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://karma") as client:
                for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"X-API-Key": "nope"}):
                    for method, path in (("POST", "/search"), ("DELETE", "/users/u1/history"), ("GET", "/info")):
                        r = await client.request(
                            method, path, json=search if method == "POST" else None, headers=headers
                        )
                        assert r.status_code == 401 and r.json()["type"] == "unauthorized", (path, r.text)
                        assert r.headers["www-authenticate"].startswith("Bearer")
                assert (
                    await client.post("/search", json=search, headers={"Authorization": f"Bearer {key}"})
                ).status_code == 200
                assert (await client.post("/search", json=search, headers={"X-API-Key": key})).status_code == 200
                for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
                    assert (await client.get(open_path)).status_code in (200, 503), open_path
                preflight = await client.options(
                    "/search",
                    headers={
                        "Origin": "https://app.example.com",
                        "Access-Control-Request-Method": "POST",
                        "Access-Control-Request-Headers": "authorization,content-type",
                    },
                )
                assert preflight.status_code == 200
                assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
                other = await client.options(
                    "/search", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
                )
                assert "access-control-allow-origin" not in other.headers
                metrics = (await client.get("/metrics")).text
                assert 'karma_rejected_total{reason="unauthorized"} 9.0' in metrics
                assert key not in (await client.get("/info", headers={"X-API-Key": key})).text

    asyncio.run(scenario())


def test_search_says_when_the_query_was_cut_to_max_query_tokens(tiny_export: tuple[Path, Path]) -> None:
    bundle = tiny_export[1]
    limit = load_bundle(bundle, check_graphs=False, with_index=False).manifest.max_query_tokens
    config = ServeConfig(bundle=bundle, redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.2, access_log=False)
    app = create_app(config)

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://karma") as client:
                short = await client.post("/search", json={"query": "red shoes", "k": 3})
                long = await client.post("/search", json={"query": " ".join(["red shoes"] * limit), "k": 3})
                assert short.status_code == long.status_code == 200
                assert short.json()["query_truncated"] is False and long.json()["query_truncated"] is True

    asyncio.run(scenario())


def test_metrics_have_process_series_and_no_created_series() -> None:
    from service.metrics import Metrics

    text = Metrics().render().decode()
    assert "process_resident_memory_bytes" in text and "process_open_fds" in text and "python_info" in text
    assert "_created" not in text  # one useless series per counter/histogram, off
