"""Helpers shared by the tests (conftest.py keeps only fixtures and the tier hook): where things are,
the test Redis, small writers and the tiny training profile."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from karma.config import ServeConfig, profile_overrides
from service.app import create_app

REPO = Path(__file__).resolve().parents[1]
KARMA_BIN = str(Path(sys.executable).with_name("karma"))
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_up() -> bool:
    """Whether the test Redis answers a ping (tests that need it are skipped otherwise)."""
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


needs_redis = pytest.mark.skipif(not redis_up(), reason=f"no Redis at {REDIS_URL}")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def tiny_train_overrides(tmp_path: Path) -> list[str]:
    """A seconds-scale training run (configs/tiny.yaml, the one tiny profile) writing under `tmp_path`."""
    return [f"paths.artifacts={tmp_path / 'artifacts'}", *profile_overrides()]


# ---- talking to the real app (service tests) ------------------------------------------------------


@asynccontextmanager
async def serving(bundle_dir: Path, prefix: str, **overrides: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    settings = {
        "bundle": bundle_dir,
        "intra_op_threads": 1,
        "access_log": False,
        "redis_url": REDIS_URL,
        "redis_key_prefix": prefix,
        "bundle_root": Path("/"),  # test bundles live in different pytest tmp folders
        **overrides,
    }
    app = create_app(ServeConfig(**settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://karma") as client:
            yield app, client


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def direct_search(reference: dict[str, Any], query: str, history: list[str], k: int, exclude: bool) -> tuple:
    """Encode with the bundle's sessions and brute-force inner products over item_embeddings."""
    bundle = reference["bundle"]
    row_of = {str(item): row for row, item in enumerate(bundle.items["item_id"].tolist())}
    rows = [row_of[i] for i in history if i in row_of]
    feeds = bundle.query_feeds([query], [np.asarray(rows, dtype=np.int64)])
    h = reference["sessions"].encode_query(feeds)[0]
    scores = bundle.item_embeddings @ h
    if exclude and rows:
        scores[np.asarray(rows)] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    order = order[np.isfinite(scores[order])]
    item_ids = bundle.items["item_id"].astype(str).to_numpy()
    return list(item_ids[order]), scores[order]


def assert_same_ranking(got: dict[str, Any], ref_ids: list[str], ref_scores: np.ndarray) -> None:
    ids = [i["item_id"] for i in got["items"]]
    scores = np.array([i["score"] for i in got["items"]])
    assert len(ids) == len(ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    for pos, (a, b) in enumerate(zip(ids, ref_ids, strict=True)):
        if a != b:  # only a near-tie may swap places
            neighbours = ref_scores[max(0, pos - 1) : pos + 2]
            assert np.ptp(neighbours) < 1e-5, f"rank {pos}: {a} vs {b} (scores {neighbours})"


def catalog(reference: dict[str, Any]) -> list[str]:
    return reference["bundle"].items["item_id"].astype(str).tolist()


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: dict, name: str, **labels: str) -> float:
    """Sum of samples `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def assert_error(response: httpx.Response, status: int, type_: str | None = None, field: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) >= {"error", "type", "field"} and isinstance(body["error"], str) and body["error"]
    if type_ is not None:
        assert body["type"] == type_, body
    if field is not None:
        assert body["field"] == field, body
    return body


# ---- search ------------------------------------------------------------------------------------------
