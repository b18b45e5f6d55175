"""Batch search and the embeddings routes on a real tiny bundle, real ORT + FAISS, the real HTTP app.

`/search/batch` must rank each input exactly as `/search` does; `/embed` must return the h_t the
ONNX query encoder computes and the index's own item vectors; `/v1/embeddings` must speak OpenAI's
shape (float and base64) over the same h_t.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import assert_same_ranking, catalog, direct_search, metric_samples, needs_redis, run, serving


def ort_h(reference: dict[str, Any], query: str, history: list[str]) -> np.ndarray:
    """h_t straight from the bundle's ONNX session (batch of one)."""
    bundle = reference["bundle"]
    row_of = {str(item): row for row, item in enumerate(bundle.items["item_id"].tolist())}
    rows = np.asarray([row_of[i] for i in history if i in row_of], dtype=np.int64)
    return reference["sessions"].encode_query(bundle.query_feeds([query.strip()], [rows]))[0]


def test_batch_search_ranks_each_input_as_a_single_search(bundle_dir: Path, reference: dict, prefix: str) -> None:
    items = catalog(reference)
    inputs = [
        {"query": "red running shoes", "history": items[3:9], "k": 7},
        {"query": "", "history": items[40:60], "k": 5, "exclude_history": True},
        {"query": "gift mug", "k": 4},
        {"query": "blue", "history": [*items[1:4], "not-an-item"], "k": 12, "exclude_history": False},
    ]

    async def go() -> tuple[Any, list[Any]]:
        async with serving(bundle_dir, prefix) as (_, client):
            batch = await client.post("/search/batch", json={"inputs": inputs})
            singles = [await client.post("/search", json=body) for body in inputs]
            return batch, singles

    batch, singles = run(go())
    assert batch.status_code == 200, batch.text
    body = batch.json()
    assert len(body["results"]) == len(inputs) and body["timings_ms"]["total"] > 0
    for given, got, single in zip(inputs, body["results"], singles, strict=True):
        assert single.status_code == 200
        alone = single.json()
        assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in alone["items"]]
        ref_ids, ref_scores = direct_search(
            reference, given["query"], given.get("history", []), given["k"], given.get("exclude_history", True)
        )
        assert_same_ranking(got, ref_ids, ref_scores)
        for key in ("history_used", "history_truncated", "unknown_items", "query_truncated", "model_version"):
            assert got[key] == alone[key], key
    assert body["results"][3]["unknown_items"] == ["not-an-item"]
    assert max(r["batch_size"] for r in body["results"]) > 1  # the inputs were encoded together


@pytest.mark.parametrize(
    ("inputs", "status", "kind", "field"),
    [
        ([{"query": "a"}, {"query": "", "history": []}], 422, "validation_error", "inputs[1].query"),
        ([{"query": "a"}, {"query": "b"}, {"query": "c", "k": 0}], 422, "validation_error", "inputs[2].k"),
        ([{"query": "a"}, {"history": ["nope"]}], 422, "unknown_items", "inputs[1].history"),
        ([{"query": "q"}] * 4, 422, "validation_error", "inputs"),  # over serve.max_batch_inputs=3
        ([], 422, "validation_error", "inputs"),
        ([{"query": "x" * 40}], 422, "validation_error", "inputs[0].query"),  # over max_query_chars=32
    ],
)
def test_batch_search_fails_whole_naming_the_input(
    bundle_dir: Path, prefix: str, inputs: list, status: int, kind: str, field: str
) -> None:
    async def go() -> Any:
        async with serving(bundle_dir, prefix, max_batch_inputs=3, max_query_chars=32) as (_, client):
            return await client.post("/search/batch", json={"inputs": inputs})

    response = run(go())
    assert response.status_code == status, response.text
    error = response.json()
    assert (error["type"], error["field"]) == (kind, field)
    assert "Traceback" not in response.text


def test_a_batch_the_queue_can_never_hold_is_a_422_and_one_that_fits_runs(bundle_dir: Path, prefix: str) -> None:
    async def go() -> tuple[Any, Any]:
        async with serving(bundle_dir, prefix, queue_size=2, max_batch_inputs=8) as (_, client):
            refused = await client.post("/search/batch", json={"inputs": [{"query": "a"}] * 3})
            fits = await client.post("/search/batch", json={"inputs": [{"query": "a"}] * 2})
            return refused, fits

    refused, fits = run(go())
    assert refused.status_code == 422 and (refused.json()["type"], refused.json()["field"]) == (
        "validation_error",
        "inputs",
    )
    assert "serve.queue_size=2" in refused.json()["error"]  # no Retry-After: retrying cannot help
    assert "Retry-After" not in refused.headers
    assert fits.status_code == 200


def test_many_jobs_are_queued_all_or_none_in_one_step() -> None:
    """enqueue_many checks the room and queues in one event-loop step: a batch is never half-queued."""
    import numpy as np

    from service.batching import MicroBatcher, QueueFull
    from service.engine import Job

    async def go() -> tuple[int, int]:
        batcher = MicroBatcher(max_batch=4, max_wait_s=0.0, queue_size=3)
        batcher._accepting = True  # no worker: the queue only fills
        job = lambda: Job("q", np.zeros(0, dtype=np.int64), 1, np.zeros(0, dtype=np.int64))  # noqa: E731
        batcher.enqueue_many(None, [job(), job()])  # type: ignore[arg-type]  # an engine is never used here
        with pytest.raises(QueueFull, match="room for 1 of this request's 2 inputs"):
            batcher.enqueue_many(None, [job(), job()])  # type: ignore[arg-type]
        depth = batcher.depth
        batcher.enqueue_many(None, [job()])  # type: ignore[arg-type]
        return depth, batcher.depth

    assert run(go()) == (2, 3)


def test_embed_returns_the_onnx_h_t_and_the_index_item_vectors(bundle_dir: Path, reference: dict, prefix: str) -> None:
    items = catalog(reference)
    inputs = [
        {"query": "red running shoes", "history": items[3:9]},
        {"query": "gift mug"},
        {"history": [*items[50:70], "unknown-id"]},
    ]

    async def go() -> tuple[Any, Any, Any]:
        async with serving(bundle_dir, prefix) as (_, client):
            plain = await client.post("/embed", json={"inputs": inputs, "item_ids": items[:5]})
            packed = await client.post(
                "/embed", json={"inputs": inputs, "item_ids": items[:5], "encoding_format": "base64"}
            )
            search = await client.post("/search", json={**inputs[0], "k": 5, "exclude_history": False})
            return plain, packed, search

    plain, packed, search = run(go())
    assert plain.status_code == 200, plain.text
    body = plain.json()
    dim = reference["bundle"].manifest.dims.embed_dim
    assert body["dim"] == dim and len(body["embeddings"]) == 3
    for given, got in zip(inputs, body["embeddings"], strict=True):
        np.testing.assert_allclose(
            np.asarray(got, np.float32), ort_h(reference, given.get("query", ""), given.get("history", [])), atol=1e-5
        )
    vectors = np.asarray(body["item_vectors"], np.float32)
    np.testing.assert_array_equal(vectors, reference["bundle"].item_embeddings[:5])  # exact: float32 round-trips
    assert body["inputs"][2]["unknown_items"] == ["unknown-id"] and body["inputs"][2]["history_used"] == 20
    decoded = [np.frombuffer(base64.b64decode(v), dtype="<f4") for v in packed.json()["embeddings"]]
    np.testing.assert_array_equal(np.stack(decoded), np.asarray(body["embeddings"], np.float32))
    # score = h_t . item vector: the embeddings reproduce /search's scores
    hit_rows = [items.index(i["item_id"]) for i in search.json()["items"]]
    h = np.asarray(body["embeddings"][0], np.float32)
    np.testing.assert_allclose(
        reference["bundle"].item_embeddings[hit_rows] @ h, [i["score"] for i in search.json()["items"]], atol=1e-5
    )


@pytest.mark.parametrize(
    ("payload", "kind", "field"),
    [
        ({}, "validation_error", "inputs"),
        ({"item_ids": ["no-such-item"]}, "unknown_items", "item_ids[0]"),
        ({"inputs": [{"query": "ok"}, {}]}, "validation_error", "inputs[1].query"),
        ({"inputs": [{"query": "ok", "k": 3}]}, "validation_error", "inputs[0].k"),  # /embed has no k
        ({"inputs": [{"query": "ok"}], "encoding_format": "hex"}, "validation_error", "encoding_format"),
    ],
)
def test_embed_bad_bodies_get_typed_422s(bundle_dir: Path, prefix: str, payload: dict, kind: str, field: str) -> None:
    async def go() -> Any:
        async with serving(bundle_dir, prefix) as (_, client):
            return await client.post("/embed", json=payload)

    response = run(go())
    assert response.status_code == 422, response.text
    assert (response.json()["type"], response.json()["field"]) == (kind, field)


@needs_redis
def test_openai_embeddings_shape_float_base64_and_user_history(bundle_dir: Path, reference: dict, prefix: str) -> None:
    items = catalog(reference)

    async def go() -> dict[str, Any]:
        async with serving(bundle_dir, prefix) as (_, client):
            for item in items[10:16]:
                assert (await client.post("/events", json={"user_id": "u-openai", "item_id": item})).status_code == 200
            out = {
                "list": await client.post("/v1/embeddings", json={"input": ["red shoes", "gift mug"], "model": "x"}),
                "one": await client.post("/v1/embeddings", json={"input": "red shoes", "encoding_format": "base64"}),
                "user": await client.post("/v1/embeddings", json={"input": ["red shoes"], "user": "u-openai"}),
                "embed": await client.post("/embed", json={"inputs": [{"query": "red shoes", "user_id": "u-openai"}]}),
            }
            for name, payload in {
                "tokens": {"input": [[1, 2, 3]]},
                "dims": {"input": "red shoes", "dimensions": 7},
                "blank": {"input": ["ok", "  "]},
                "control": {"input": "a\x00b"},
            }.items():
                out[name] = await client.post("/v1/embeddings", json=payload)
            return out

    got = run(go())
    listed = got["list"].json()
    assert got["list"].status_code == 200 and listed["object"] == "list"
    assert [d["index"] for d in listed["data"]] == [0, 1] and {d["object"] for d in listed["data"]} == {"embedding"}
    assert listed["usage"]["prompt_tokens"] > 0 and listed["usage"]["total_tokens"] == listed["usage"]["prompt_tokens"]
    for text, datum in zip(["red shoes", "gift mug"], listed["data"], strict=True):
        np.testing.assert_allclose(np.asarray(datum["embedding"], np.float32), ort_h(reference, text, []), atol=1e-5)
    one = np.frombuffer(base64.b64decode(got["one"].json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(one, listed["data"][0]["embedding"], atol=1e-5)
    personal = np.asarray(got["user"].json()["data"][0]["embedding"], np.float32)
    np.testing.assert_allclose(personal, ort_h(reference, "red shoes", items[10:16]), atol=1e-5)
    np.testing.assert_allclose(personal, got["embed"].json()["embeddings"][0], atol=1e-5)
    assert not np.allclose(personal, listed["data"][0]["embedding"], atol=1e-3)  # the history changed h_t
    expected = {"tokens": "input", "dims": "dimensions", "blank": "input[1]", "control": "input"}
    for name, field in expected.items():
        assert got[name].status_code == 422, (name, got[name].text)
        assert got[name].json()["field"] == field, (name, got[name].json())


def test_new_routes_are_in_the_openapi_schema_with_examples(bundle_dir: Path, prefix: str) -> None:
    async def go() -> dict[str, Any]:
        async with serving(bundle_dir, prefix) as (_, client):
            return (await client.get("/openapi.json")).json()

    schema = run(go())
    components = schema["components"]["schemas"]
    for path, model in [
        ("/search/batch", "BatchSearchRequest"),
        ("/embed", "EmbedRequest"),
        ("/v1/embeddings", "OpenAIEmbeddingsRequest"),
    ]:
        assert "post" in schema["paths"][path]
        assert components[model].get("examples"), model


def test_metrics_label_requests_answered_before_routing_by_their_route(bundle_dir: Path, prefix: str) -> None:
    """413s, docs assets and 404s get real endpoint labels ("unmatched" only where no route serves the path)."""

    async def go() -> str:
        async with serving(bundle_dir, prefix, max_body_bytes=2048) as (_, client):
            big = await client.post("/embed", content=b'{"inputs": [' + b" " * 4096 + b"]}")
            assert big.status_code == 413
            assert (await client.get("/docs/static/swagger-ui.css")).status_code == 200
            assert (await client.get("/no/such/route")).status_code == 404
            assert (await client.delete("/search")).status_code == 405
            return (await client.get("/metrics")).text

    samples = metric_samples(run(go()))
    counts = {
        (dict(labels)["endpoint"], dict(labels)["status"])
        for (name, labels), value in samples.items()
        if name == "karma_request_duration_seconds_count" and value > 0
    }
    assert {("/embed", "413"), ("/docs/static/{path}", "200"), ("unmatched", "404"), ("/search", "405")} <= counts
