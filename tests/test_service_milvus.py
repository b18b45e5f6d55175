"""The Milvus index backend against a real Milvus Lite (embedded Milvus, same client as standalone/cluster).

FLAT inner product in Milvus must rank exactly as the bundle's FAISS flat index, through the backend
and through the whole HTTP app; upserts and deletes change what is found; a restarted service finds
the collection it filled (and the vectors upserted into it) instead of rebuilding it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from karma.bundle import load_bundle
from karma.config import ServeConfig
from service.app import create_app
from service.index import FaissBackend, MilvusBackend, collection_name

pytest.importorskip("milvus_lite", reason="milvus-lite is in the dev extra")


@pytest.fixture(scope="module")
def bundle(tiny_export: tuple[Path, Path]) -> Any:
    return load_bundle(tiny_export[1])


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_milvus_flat_ranks_exactly_like_faiss_flat_and_takes_upserts_and_deletes(bundle: Any, tmp_path: Path) -> None:
    embeddings = np.ascontiguousarray(bundle.item_embeddings, dtype=np.float32)
    faiss = FaissBackend(bundle.index, embeddings)
    milvus = MilvusBackend(str(tmp_path / "m.db"), "parity", embeddings.shape[1])
    try:
        assert milvus.ensure(embeddings) is True and milvus.count() == len(embeddings)
        queries = unit(np.random.default_rng(0).standard_normal((16, embeddings.shape[1])))
        for k in (1, 10, 100):
            f_scores, f_rows = faiss.search(queries, k)
            m_scores, m_rows = milvus.search(queries, k)
            np.testing.assert_allclose(m_scores, f_scores, atol=1e-5)
            ties = np.isclose(m_scores, f_scores, atol=1e-6) & (m_rows != f_rows)  # equal scores may swap
            assert (m_rows == f_rows).mean() > 0.99 and not (~ties & (m_rows != f_rows)).any()
        new_row = len(embeddings)
        target = queries[:1]
        milvus.upsert([new_row], target)  # an item added after export, aimed straight at query 0
        scores, rows = milvus.search(target, 3)
        assert rows[0, 0] == new_row and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        assert milvus.count() == len(embeddings) + 1
        milvus.delete([new_row])
        assert new_row not in milvus.search(target, 10)[1][0] and milvus.count() == len(embeddings)
        faiss.upsert([new_row], target)  # FAISS: the same change, held in this process's delta
        f_scores, f_rows = faiss.search(target, 3)
        assert f_rows[0, 0] == new_row and f_scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        faiss.delete([new_row])
        assert new_row not in faiss.search(target, 10)[1][0] and faiss.count() == len(embeddings)
    finally:
        milvus.close()


async def _answers(config: ServeConfig, bodies: list[dict]) -> tuple[list[dict], dict, dict]:
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://karma") as client:
            answers = []
            for body in bodies:
                response = await client.post("/search", json=body)
                assert response.status_code == 200, response.text
                answers.append(response.json())
            info = (await client.get("/info")).json()
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            return answers, info, ready.json()


def test_the_service_on_milvus_answers_like_the_service_on_faiss_and_restarts_on_its_collection(
    bundle: Any, tiny_export: tuple[Path, Path], tmp_path: Path
) -> None:
    items = [str(i) for i in bundle.items["item_id"].tolist()]
    bodies = [
        {"query": "red running shoes", "history": items[3:9], "k": 7},
        {"query": "", "history": items[40:60], "k": 25, "exclude_history": True},
        {"query": "gift mug", "k": 50},
    ]
    base = {"bundle": tiny_export[1], "redis_url": "redis://127.0.0.1:1/0", "redis_timeout_s": 0.2, "access_log": False}
    uri = str(tmp_path / "service.db")
    faiss_answers, faiss_info, _ = asyncio.run(_answers(ServeConfig(**base), bodies))
    milvus_config = ServeConfig(**base, index_backend="milvus", milvus_uri=uri)
    milvus_answers, info, ready = asyncio.run(_answers(milvus_config, bodies))
    for f, m in zip(faiss_answers, milvus_answers, strict=True):
        assert [i["item_id"] for i in m["items"]] == [i["item_id"] for i in f["items"]]
        np.testing.assert_allclose([i["score"] for i in m["items"]], [i["score"] for i in f["items"]], atol=1e-5)
    assert _find(faiss_info, "index_backend")["backend"] == "faiss"
    described = _find(info, "index_backend")
    assert described["backend"] == "milvus" and described["shared"]
    name = collection_name("karma_", bundle.manifest.model_version)
    assert described["collection"] == name
    assert ready["checks"]["index"] == {"ok": True, "backend": "milvus", "n_items": len(items)}

    # Vectors upserted into the shared collection survive a restart. Rows past the bundle's last (items added
    # later, which this bundle has no id for) are never answered, even when they score best.
    store = MilvusBackend(uri, name, bundle.item_embeddings.shape[1])
    top = [items.index(i["item_id"]) for i in milvus_answers[2]["items"][:5]]
    try:
        store.upsert(range(len(items), len(items) + 5), np.asarray(bundle.item_embeddings)[top])
        assert store.ensure(np.asarray(bundle.item_embeddings)) is False  # complete: kept, not rebuilt
    finally:
        store.close()
    again, _, ready_again = asyncio.run(_answers(milvus_config, bodies))
    assert ready_again["checks"]["index"]["n_items"] == len(items) + 5
    for before, after in zip(milvus_answers, again, strict=True):
        assert {i["item_id"] for i in after["items"]} <= set(items)
        assert [i["item_id"] for i in after["items"]] == [i["item_id"] for i in before["items"]][: len(after["items"])]


def test_a_fill_that_stopped_midway_is_topped_up_and_a_live_delete_is_not_undone(bundle: Any, tmp_path: Path) -> None:
    embeddings = np.ascontiguousarray(bundle.item_embeddings, dtype=np.float32)
    store = MilvusBackend(str(tmp_path / "short.db"), "short", embeddings.shape[1])
    try:
        assert store.ensure(embeddings[:100]) is True and store.count() == 100
        store.client.drop_collection(store.filled_marker)  # as if that fill had stopped before it completed
        assert store.ensure(embeddings) is True and store.count() == len(embeddings)
        assert store.ensure(embeddings) is False and store.count() == len(embeddings)  # upserts: no duplicates
        store.delete([3])  # an item deleted live from a complete collection is not brought back by a restart
        assert store.ensure(embeddings) is False and store.count() == len(embeddings) - 1
    finally:
        store.close()


def _find(tree: Any, key: str) -> Any:
    """The first value under `key` anywhere in a nested /info answer."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


def test_an_unreachable_milvus_or_a_collection_of_another_width_is_one_clear_error(
    bundle: Any, tiny_export: tuple[Path, Path], tmp_path: Path
) -> None:
    from karma.errors import KarmaError
    from service.engine import Engine
    from service.state import milvus_backend

    config = ServeConfig(bundle=tiny_export[1], index_backend="milvus", milvus_uri="http://127.0.0.1:1")
    with pytest.raises(KarmaError, match=r"index backend failed: Milvus at http://127.0.0.1:1: cannot connect"):
        Engine.prepare(tiny_export[1], ["CPUExecutionProvider"], 1, 1, index_backend=milvus_backend(config))
    other = MilvusBackend(str(tmp_path / "w.db"), "wide", 8)
    try:
        other.ensure(unit(np.ones((3, 8), dtype=np.float32)))
        clash = MilvusBackend(str(tmp_path / "w.db"), "wide", bundle.item_embeddings.shape[1])
        with pytest.raises(KarmaError, match="holds 8-d vectors"):
            clash.ensure(np.asarray(bundle.item_embeddings))
    finally:
        other.close()
