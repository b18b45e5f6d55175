"""Where the item vectors are searched: one interface, two engines (`serve.index_backend`).

    faiss   the bundle's own FAISS index in this process (default; exact flat, HNSW or IVF-PQ with
            re-rank). Changes (upsert/delete) live in this replica only and are lost on restart.
    milvus  a Milvus collection through `pymilvus`: Milvus Lite (an embedded file, `serve.milvus_uri`
            = a path, e.g. artifacts/milvus/karma.db) on one box, or Milvus standalone/cluster
            (`http://host:19530`) shared by every replica, so an upsert is seen by all of them and
            survives restarts. Exact inner-product search (FLAT) unless `serve.milvus_index` says otherwise.

Rows are the bundle's item rows (the position in items.parquet, item_embeddings.npy); an item added
later gets a row past the bundle's last. Every backend answers `search` with (scores, rows), best
first, rows -1 where fewer than k exist, exactly like `karma.search.search_top_k`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from karma.errors import KarmaError
from karma.search import search_top_k

log = logging.getLogger("karma.service")

MILVUS_BATCH = 2000  # vectors per insert call


class IndexBackend(Protocol):
    name: str
    shared: bool  # changes are seen by every replica and survive restarts

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def upsert(self, rows: Sequence[int], vectors: np.ndarray) -> None: ...
    def delete(self, rows: Sequence[int]) -> None: ...
    def count(self) -> int: ...
    def describe(self) -> dict[str, Any]: ...


class FaissBackend:
    """The bundle's FAISS index, searched in-process (re-ranked with exact embeddings when approximate)."""

    name = "faiss"
    shared = False

    def __init__(self, index: Any, embeddings: np.ndarray, rerank_factor: int = 1, index_type: str = "flat"):
        self.index = index
        self.embeddings = embeddings
        self.rerank_factor = rerank_factor
        self.index_type = index_type

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return search_top_k(self.index, self.embeddings, queries, k, self.rerank_factor)

    def upsert(self, rows: Sequence[int], vectors: np.ndarray) -> None:
        raise KarmaError("the faiss backend is read-only in this version: serve.index_backend=milvus takes upserts")

    def delete(self, rows: Sequence[int]) -> None:
        raise KarmaError("the faiss backend is read-only in this version: serve.index_backend=milvus takes deletes")

    def count(self) -> int:
        return int(self.index.ntotal)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "type": self.index_type, "items": self.count(), "shared": self.shared}


class MilvusBackend:
    """A Milvus collection of (row INT64 primary key, vector FLOAT_VECTOR), inner-product metric."""

    name = "milvus"
    shared = True

    def __init__(self, uri: str, collection: str, dim: int, index_type: str = "FLAT", token: str | None = None):
        try:
            from pymilvus import MilvusClient
        except ImportError as exc:
            raise KarmaError(
                f"serve.index_backend=milvus needs pymilvus (and milvus-lite for a file URI): {exc}"
            ) from None
        self.uri = uri
        self.collection = collection
        self.dim = dim
        self.index_type = index_type
        try:
            self.client = MilvusClient(uri, token=token or "")
        except Exception as exc:  # pymilvus raises its own MilvusException, or OSError for a bad path
            raise KarmaError(f"Milvus at {uri}: cannot connect: {exc}") from None

    def ensure(self, embeddings: np.ndarray) -> bool:
        """Create and fill the collection from the bundle's embeddings when it does not exist yet; load it.
        Returns True when it was (re)built. An existing collection is kept as is (with its upserts)."""
        from pymilvus import DataType

        client = self.client
        if client.has_collection(self.collection):
            dim = next(
                (
                    f["params"].get("dim")
                    for f in client.describe_collection(self.collection)["fields"]
                    if f["name"] == "vector"
                ),
                None,
            )
            if dim is not None and int(dim) != self.dim:
                raise KarmaError(f"Milvus collection {self.collection} holds {dim}-d vectors, the bundle {self.dim}-d")
            client.load_collection(self.collection)
            return False
        started = time.perf_counter()
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("row", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        params = client.prepare_index_params()
        params.add_index(field_name="vector", index_type=self.index_type, metric_type="IP")
        client.create_collection(self.collection, schema=schema, index_params=params)
        self.upsert(range(len(embeddings)), embeddings, insert=True)
        client.flush(self.collection)  # seal the segments so searches do not scan a growing one
        client.load_collection(self.collection)
        log.info(
            "Milvus collection %s: %d vectors inserted in %.1f s", self.collection, len(embeddings),
            time.perf_counter() - started,
        )  # fmt: skip
        return True

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        hits = self.client.search(
            self.collection,
            data=queries.tolist(),
            limit=k,
            anns_field="vector",
            search_params={"metric_type": "IP"},
            output_fields=["row"],
        )
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for i, found in enumerate(hits):
            for j, hit in enumerate(found[:k]):
                rows[i, j] = int(hit["row"])
                scores[i, j] = float(hit["distance"])
        return scores, rows

    def upsert(self, rows: Sequence[int], vectors: np.ndarray, insert: bool = False) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows = list(rows)
        write = self.client.insert if insert else self.client.upsert
        for start in range(0, len(rows), MILVUS_BATCH):
            chunk = [
                {"row": int(row), "vector": vectors[i].tolist()}
                for i, row in enumerate(rows[start : start + MILVUS_BATCH], start)
            ]
            write(self.collection, chunk)

    def delete(self, rows: Sequence[int]) -> None:
        self.client.delete(self.collection, ids=[int(r) for r in rows])

    def count(self) -> int:
        result = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(result[0]["count(*)"])

    def describe(self) -> dict[str, Any]:
        uri = self.uri if "://" not in self.uri else self.uri.split("@")[-1]  # no credentials
        return {
            "backend": self.name,
            "type": self.index_type.lower(),
            "uri": uri,
            "collection": self.collection,
            "items": self.count(),
            "shared": self.shared,
        }

    def close(self) -> None:
        self.client.close()


def collection_name(prefix: str, model_version: str) -> str:
    """One collection per served model: `karma_<model_version>` (vectors of two models never mix)."""
    return f"{prefix}{model_version}".replace("-", "_")
