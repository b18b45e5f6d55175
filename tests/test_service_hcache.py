"""The h_t cache (`serve.h_cache_entries`) on the real app: a repeated (query, history) skips the encoder and
answers exactly as the encoder would; a new click, a live item change and a reload are never served stale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.helpers import catalog, metric_samples, needs_redis, run, sample, serving

pytestmark = needs_redis
KEY = "hcache-admin-key-0123456789"


def test_a_repeated_request_is_a_hit_with_the_same_answer_and_a_new_click_is_a_miss(
    bundle_dir: Path, reference: dict[str, Any], prefix: str
) -> None:
    items = catalog(reference)

    async def scenario() -> None:
        async with (
            serving(bundle_dir, prefix) as (_, plain),
            serving(bundle_dir, prefix + "c", h_cache_entries=64, admin_api_key=KEY) as (app, cached),
        ):
            user = "u-cache"
            for item in items[:5]:
                assert (await cached.post("/events", json={"user_id": user, "item_id": item})).status_code == 200
                await plain.post("/events", json={"user_id": user, "item_id": item})
            body = {"user_id": user, "query": "red shoes", "k": 20}

            async def hits() -> float:
                return sample(metric_samples((await cached.get("/metrics")).text), "karma_h_cache_lookups_total",
                              result="hit")  # fmt: skip

            first = (await cached.post("/search", json=body)).json()
            assert await hits() == 0
            second = (await cached.post("/search", json=body)).json()
            assert await hits() == 1  # the encoder was skipped
            reference_answer = (await plain.post("/search", json=body)).json()
            for got in (first, second):
                assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in reference_answer["items"]]
                np.testing.assert_allclose([i["score"] for i in got["items"]],
                                           [i["score"] for i in reference_answer["items"]], atol=1e-6)  # fmt: skip
            e1 = (await cached.post("/embed", json={"inputs": [{"user_id": user, "query": "red shoes"}]})).json()
            assert await hits() == 2  # /embed shares it
            np.testing.assert_allclose(e1["embeddings"][0],
                                       (await plain.post("/embed", json={"inputs": [{"user_id": user,
                                        "query": "red shoes"}]})).json()["embeddings"][0], atol=1e-6)  # fmt: skip

            # a new click is a new key: a miss, and the answer follows the new history
            await cached.post("/events", json={"user_id": user, "item_id": items[9]})
            await plain.post("/events", json={"user_id": user, "item_id": items[9]})
            after = (await cached.post("/search", json=body)).json()
            assert await hits() == 2
            assert [i["item_id"] for i in after["items"]] == [
                i["item_id"] for i in (await plain.post("/search", json=body)).json()["items"]
            ]
            # an item replaced live changes h_t of histories that hold it: the cache is cleared
            held = len(app.state.svc.engine.h_cache)
            assert held > 0
            auth = {"Authorization": f"Bearer {KEY}"}
            r = await cached.post("/items", json={"items": [{"item_id": items[9], "text": "lamp"}]}, headers=auth)
            assert r.status_code == 200 and len(app.state.svc.engine.h_cache) == 0
            info = (await cached.get("/info")).json()["h_cache"]
            assert info["hits"] == 2 and info["entries"] == 64

    run(scenario())
