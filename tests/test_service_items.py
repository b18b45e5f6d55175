"""Items that arrive live (`POST /items`, `DELETE /items/{id}`): the real app, ONNX Runtime, FAISS and Milvus Lite.

A new item must be featurised exactly as export featurised the catalog (training's own feature code
is the reference), scored from content alone (the "no ID" row), found where brute force over the
bundle's vectors plus its own ranks it, usable in histories, replaceable and deletable; with FAISS
the change is this replica's alone and a restart loses it, with Milvus a second replica sees it and a
restart keeps it. Bad bodies get typed 4xx naming the field.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from karma.bundle import MANIFEST_FILE, read_manifest, resign_bundle
from tests.helpers import assert_error, catalog, needs_redis, run, serving

KEY = "items-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}

pytestmark = needs_redis


def _training_features(reference: dict[str, Any], fields: dict[str, str], visual: list[float] | None) -> np.ndarray:
    """The features training's own code gives an item with these fields (the reference for the service's)."""
    from karma.text_features import join_item_text
    from training.features.text import HashingTextEncoder

    m = reference["bundle"].manifest
    layout = m.layout
    names = m.item_text_fields
    text = join_item_text(names, [fields.get(n, "") for n in names])
    block = layout.blocks[0]
    out = np.zeros(layout.dim, dtype=np.float32)
    out[layout.slice_of(block.name)] = HashingTextEncoder(block.dim).encode([text])[0]
    if visual is not None:
        out[layout.slice_of(layout.blocks[1].name)] = visual
    return out


def _brute_force(reference: dict[str, Any], h: np.ndarray, extra: dict[str, np.ndarray], k: int) -> tuple[list, list]:
    ids = catalog(reference) + list(extra)
    vectors = np.concatenate([np.asarray(reference["bundle"].item_embeddings), *[v[None] for v in extra.values()]])
    scores = vectors @ h
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order], scores[order]


def test_a_new_item_is_featurised_like_training_scored_from_content_found_replaced_and_deleted(
    bundle_dir: Path, reference: dict[str, Any], prefix: str
) -> None:
    bundle, sessions = reference["bundle"], reference["sessions"]
    visual = list(np.random.default_rng(3).standard_normal(bundle.manifest.layout.blocks[1].dim).astype(float))
    fields = {"title": "Zebra striped sofa", "category": "furniture"}
    expected_features = _training_features(reference, fields, visual)
    cold_vector = sessions.encode_items(expected_features[None], np.zeros(1, np.int64))[0]

    async def scenario() -> None:
        async with serving(bundle_dir, prefix, admin_api_key=KEY) as (app, client):
            r = await client.post("/items", json={"items": [{"item_id": "new-1", "text": fields, "visual": visual}]},
                                  headers=AUTH)  # fmt: skip
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["items"] == [{"item_id": "new-1", "row": bundle.manifest.n_items, "created": True}]
            assert body["backend"] == "faiss" and body["shared"] is False and "this replica" in body["note"]
            engine = app.state.svc.engine
            row = bundle.manifest.n_items
            np.testing.assert_allclose(engine.catalog.features[np.array([row])][0], expected_features, atol=1e-6)
            assert int(engine.catalog.id_rows[np.array([row])][0]) == 0  # the cold path: no trained ID row
            got = (await client.post("/embed", json={"item_ids": ["new-1"]})).json()["item_vectors"][0]
            np.testing.assert_allclose(got, cold_vector, atol=1e-5)

            # found exactly where brute force over the bundle's vectors plus the new one ranks it
            h = np.asarray((await client.post("/embed", json={"inputs": [{"query": "zebra sofa"}]})).json()
                           ["embeddings"][0], dtype=np.float32)  # fmt: skip
            ids, scores = _brute_force(reference, h, {"new-1": cold_vector}, 1000)
            rank = ids.index("new-1")
            k = min(1000, rank + 3)
            r = await client.post("/search", json={"query": "zebra sofa", "k": k})
            found = [i["item_id"] for i in r.json()["items"]]
            assert found.index("new-1") == rank or abs(scores[rank] - scores[found.index("new-1")]) < 1e-5
            np.testing.assert_allclose([i["score"] for i in r.json()["items"]], scores[:k], atol=1e-5)

            # a copy of a bundle item's text and visual vector under a new id gets exactly the features export
            # wrote for that item (training's own feature pipeline), and the cold path's vector
            source = 7
            row_item = bundle.items.iloc[source]
            m = bundle.manifest
            copy_text = {f: str(row_item[f]) for f in m.item_text_fields if row_item[f] is not None}
            copy_visual = np.asarray(bundle.item_features[source, m.layout.slice_of(m.layout.blocks[1].name)])
            r = await client.post("/items", json={"items": [{"item_id": "copy-7", "text": copy_text,
                                  "visual": copy_visual.tolist()}]}, headers=AUTH)  # fmt: skip
            copy_row = r.json()["items"][0]["row"]
            np.testing.assert_allclose(engine.catalog.features[np.array([copy_row])][0], bundle.item_features[source],
                                       atol=1e-6)  # fmt: skip
            assert (await client.delete("/items/copy-7", headers=AUTH)).status_code == 200

            # a history holding the new item is featurised with its features
            r = await client.post("/embed", json={"inputs": [{"history": ["new-1"]}]})
            features = np.concatenate([np.asarray(bundle.item_features), expected_features[None]])
            buckets = np.concatenate([np.asarray(bundle.item_id_buckets), [0]])
            from karma.featurize import query_encoder_feeds

            m = bundle.manifest
            feeds = query_encoder_feeds(bundle.tokenizer, features, [""], [np.array([row])], m.max_query_tokens,
                                        m.max_history, buckets)  # fmt: skip
            np.testing.assert_allclose(r.json()["embeddings"][0], sessions.encode_query(feeds)[0],
                                       atol=1e-5)  # fmt: skip

            # replacing a bundle item keeps its row, changes its vector, and the old vector is gone from the index
            first = catalog(reference)[0]
            r = await client.post("/items", json={"items": [{"item_id": first, "text": "Zebra striped sofa"}]},
                                  headers=AUTH)  # fmt: skip
            assert r.json()["items"] == [{"item_id": first, "row": 0, "created": False}]
            old = np.asarray(bundle.item_embeddings[0])
            r = await client.post("/embed", json={"item_ids": [first]})
            new = np.asarray(r.json()["item_vectors"][0])
            assert not np.allclose(new, old, atol=1e-3)
            assert engine.index.count() == bundle.manifest.n_items + 1
            scores_, rows_ = engine.index.search(old[None].astype(np.float32), 50)
            np.testing.assert_allclose(scores_[0][rows_[0] == 0], float(new @ old), atol=1e-5)  # not old @ old

            # delete: never found again, a second delete is a 404, readiness still counts right
            assert (await client.delete("/items/new-1", headers=AUTH)).status_code == 200
            r = await client.post("/search", json={"query": "zebra sofa", "k": k})
            assert "new-1" not in [i["item_id"] for i in r.json()["items"]]
            assert_error(await client.delete("/items/new-1", headers=AUTH), 404, "item_not_found", "item_id")
            assert (await client.get("/readyz")).status_code == 200
            items = (await client.get("/info")).json()["items"]
            assert items["added_live"] == 2 and items["deleted"] == 2 and items["replaced_live"] == 1
            metrics = (await client.get("/metrics")).text
            assert 'karma_items_changed_total{op="added"} 2.0' in metrics

        async with serving(bundle_dir, prefix, admin_api_key=KEY) as (_, client):  # FAISS: a restart loses it
            r = await client.post("/search", json={"history": ["new-1"], "query": "x", "k": 3})
            assert r.json()["unknown_items"] == ["new-1"]

    run(scenario())


def test_bad_item_bodies_get_typed_4xx_naming_the_field(bundle_dir: Path, prefix: str, tmp_path: Path) -> None:
    fixed = tmp_path / "fixed"
    shutil.copytree(bundle_dir, fixed)
    manifest = json.loads((fixed / MANIFEST_FILE).read_text())
    manifest["text_encoder"] = None
    (fixed / MANIFEST_FILE).write_text(json.dumps(manifest))
    resign_bundle(fixed)

    async def scenario() -> None:
        width = read_manifest(bundle_dir).layout.blocks[1].dim
        async with serving(bundle_dir, prefix, admin_api_key=KEY, max_upsert_items=2) as (_, client):
            one = {"item_id": "n1", "text": "lamp"}
            assert_error(await client.post("/items", json={"items": [one]}), 401, "unauthorized")
            bad = [
                ({"items": []}, "items"),
                ({"items": [one, {"item_id": "n2", "text": "a"}, {"item_id": "n3", "text": "b"}]}, "items"),
                ({"items": [{"item_id": "n1", "text": {"colour": "red"}}]}, "items[0].text.colour"),
                ({"items": [{"item_id": "n1", "text": "a", "visual": [0.5, 1.0]}]}, "items[0].visual"),
                ({"items": [{"item_id": "n1", "text": "bad \u0007 bell"}]}, None),
                ({"items": [{"item_id": "n1", "text": "a", "visual": [1e39] * width}]}, None),  # over the bound
                ({"items": [{"item_id": " ", "text": "a"}]}, None),
                ({"items": [{"item_id": "n1"}]}, None),
                ({"items": [{"item_id": "n1", "text": "a", "price": 3}]}, None),
            ]
            for body, field in bad:
                r = await client.post("/items", json=body, headers=AUTH)
                err = assert_error(r, 422)
                if field is not None:
                    assert err["field"] == field, (body, err)
            r = await client.post("/items", content=b'{"items": [{"item_id": "n", "text": "a", "visual": [NaN]}]}',
                                  headers={**AUTH, "content-type": "application/json"})  # fmt: skip
            assert r.status_code == 422
            r = await client.post("/items", json={"items": [one, {**one, "text": "desk lamp"}]}, headers=AUTH)
            assert [i["item_id"] for i in r.json()["items"]] == ["n1"]  # an id given twice: the later one counts
            schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["NewItemBody"]["properties"]
            manifest = read_manifest(bundle_dir)  # the schema states this bundle's text fields and visual width
            assert list(schema["text"]["anyOf"][1]["properties"]) == manifest.item_text_fields
            width = manifest.layout.blocks[1].dim
            assert schema["visual"]["anyOf"][0]["minItems"] == schema["visual"]["anyOf"][0]["maxItems"] == width
        async with serving(fixed, prefix, admin_api_key=KEY) as (_, client):
            r = await client.post("/items", json={"items": [{"item_id": "n1", "text": "lamp"}]}, headers=AUTH)
            assert_error(r, 409, "items_not_supported")

    run(scenario())


def test_with_milvus_a_second_replica_serves_the_item_and_a_restart_keeps_it(
    bundle_dir: Path, reference: dict[str, Any], prefix: str, tmp_path: Path
) -> None:
    pytest.importorskip("milvus_lite", reason="milvus-lite is in the dev extra")
    settings = {"admin_api_key": KEY, "index_backend": "milvus", "milvus_uri": str(tmp_path / "shared.db")}
    target = catalog(reference)[5]

    async def until(check: Any, timeout_s: float = 10.0) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            value = await check()
            if value or asyncio.get_running_loop().time() > deadline:
                return value
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        async with serving(bundle_dir, prefix, **settings) as (_, a), serving(bundle_dir, prefix, **settings) as (_, b):
            r = await a.post("/items", json={"items": [{"item_id": "shared-1", "text": "Zebra lamp"}]}, headers=AUTH)
            assert r.status_code == 200 and r.json()["shared"] is True, r.text
            row = r.json()["items"][0]["row"]

            async def b_knows() -> bool:
                r = await b.post("/embed", json={"inputs": [{"history": ["shared-1"]}]})
                return r.status_code == 200

            assert await until(b_knows), "replica B never heard of the item replica A added"
            mine = (await a.post("/embed", json={"item_ids": ["shared-1"]})).json()["item_vectors"][0]
            theirs = (await b.post("/embed", json={"item_ids": ["shared-1"]})).json()["item_vectors"][0]
            np.testing.assert_allclose(theirs, mine, atol=1e-6)

            body = {"query": "zebra lamp", "history": [target]}

            async def finds(client: Any) -> bool:  # searching with k = the new item's brute-force rank + 2 names it
                h = np.asarray((await client.post("/embed", json={"inputs": [body]})).json()["embeddings"][0])
                rank = int((np.asarray(reference["bundle"].item_embeddings) @ h > np.dot(mine, h) + 1e-5).sum())
                r = await client.post("/search", json={**body, "k": min(1000, rank + 2), "exclude_history": False})
                return "shared-1" in [i["item_id"] for i in r.json()["items"]]

            async def b_finds() -> bool:  # B names the row A added (a Milvus result + B's registry copy)
                return await finds(b)

            assert await until(b_finds)
            # a reload (same bundle, a new engine) replays the registry: A still serves its own item
            assert (await a.post("/admin/reload", headers=AUTH)).status_code == 200
            assert await finds(a)
            # B deletes it; A stops finding it
            assert (await b.delete("/items/shared-1", headers=AUTH)).status_code == 200

            async def a_forgot() -> bool:
                return not await finds(a)

            assert await until(a_forgot)
            r = await a.post("/items", json={"items": [{"item_id": "shared-1", "text": "Zebra lamp"}]}, headers=AUTH)
            assert r.json()["items"][0]["row"] == row  # an id keeps its row for good
        async with serving(bundle_dir, prefix, **settings) as (_, c):  # a restart replays the registry
            assert await finds(c)
            r = await c.post("/search", json={"history": ["shared-1"], "k": 5})
            assert r.json()["unknown_items"] == []
            assert (await c.get("/readyz")).status_code == 200

    run(scenario())


def test_the_faiss_delta_ranks_like_brute_force_with_more_hidden_rows_than_k(reference: dict[str, Any]) -> None:
    from service.index import FaissBackend

    bundle = reference["bundle"]
    embeddings = np.ascontiguousarray(bundle.item_embeddings, dtype=np.float32)
    backend = FaissBackend(bundle.index, embeddings)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((4, embeddings.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    hidden = np.argsort(-(embeddings @ queries[0]))[:300]  # the 300 best rows of query 0: far more than k
    backend.delete(hidden[:200])
    n = len(embeddings)
    replaced = rng.standard_normal((100, embeddings.shape[1])).astype(np.float32)
    backend.upsert(hidden[200:], replaced)  # bundle rows with new vectors
    extra = rng.standard_normal((50, embeddings.shape[1])).astype(np.float32)
    backend.upsert(range(n, n + 50), extra)  # new rows
    truth = np.concatenate([embeddings, extra])
    truth[hidden[200:]] = replaced
    alive = np.ones(len(truth), dtype=bool)
    alive[hidden[:200]] = False
    for k in (1, 10, 100):
        scores, rows = backend.search(queries, k)
        for q in range(len(queries)):
            expected = truth @ queries[q]
            expected[~alive] = -np.inf
            order = np.argsort(-expected, kind="stable")[:k]
            np.testing.assert_allclose(scores[q], expected[order], atol=1e-5)
            assert set(rows[q]) == set(order) or np.ptp(expected[order][-2:]) < 1e-5
    assert backend.count() == n - 200 + 50
