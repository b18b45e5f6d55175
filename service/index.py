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

MILVUS_BATCH = 2000  # vectors per upsert call
MILVUS_MAX_LIMIT = 16_384  # Milvus refuses a search limit (top-k) above this


class IndexUnavailable(KarmaError):
    """The index backend did not answer (Milvus down, timed out, refused): the request gets a 503."""


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

    def __init__(
        self,
        uri: str,
        collection: str,
        dim: int,
        index_type: str = "FLAT",
        token: str | None = None,
        timeout_s: float = 5.0,
    ):
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
        self.timeout_s = timeout_s  # every call: a hung Milvus must not wedge the encoder thread
        try:
            self.client = MilvusClient(uri, token=token or "", timeout=timeout_s)
        except Exception as exc:  # pymilvus raises its own MilvusException, or OSError for a bad path
            raise KarmaError(f"Milvus at {uri}: cannot connect: {exc}") from None

    def ensure(self, embeddings: np.ndarray) -> bool:
        """Create the collection from the bundle's embeddings when it does not exist, top it up when it holds
        fewer rows than the bundle (a fill that stopped midway), then load it. Returns True when it wrote the
        bundle's vectors. Filling upserts (never inserts), so replicas that start together cannot duplicate rows;
        a collection that is complete is kept as is, with the vectors upserted into it since."""
        from pymilvus import DataType

        client = self.client
        wrote = False
        if client.has_collection(self.collection):
            fields = client.describe_collection(self.collection)["fields"]
            dim = next((f["params"].get("dim") for f in fields if f["name"] == "vector"), None)
            if dim is not None and int(dim) != self.dim:
                raise KarmaError(f"Milvus collection {self.collection} holds {dim}-d vectors, the bundle {self.dim}-d")
            client.load_collection(self.collection)
            if self.count() < len(embeddings):
                log.warning("Milvus collection %s is short of the bundle's %d items: topping it up", self.collection,
                            len(embeddings))  # fmt: skip
                wrote = True
        else:
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("row", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            params = client.prepare_index_params()
            params.add_index(field_name="vector", index_type=self.index_type, metric_type="IP")
            client.create_collection(self.collection, schema=schema, index_params=params)
            wrote = True
        if wrote:
            started = time.perf_counter()
            self.upsert(range(len(embeddings)), embeddings)
            client.flush(self.collection)  # seal the segments so searches do not scan a growing one
            client.load_collection(self.collection)
            log.info(
                "Milvus collection %s: %d vectors written in %.1f s", self.collection, len(embeddings),
                time.perf_counter() - started,
            )  # fmt: skip
        return wrote

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        try:
            hits = self.client.search(
                self.collection,
                data=queries.tolist(),
                limit=min(k, MILVUS_MAX_LIMIT),
                anns_field="vector",
                search_params={"metric_type": "IP"},
                output_fields=["row"],
                timeout=self.timeout_s,
            )
        except Exception as exc:  # MilvusException, gRPC errors, timeouts: the index is unavailable
            raise IndexUnavailable(f"Milvus at {self._where()}: search failed: {exc}") from None
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for i, found in enumerate(hits):
            for j, hit in enumerate(found[:k]):
                rows[i, j] = int(hit["row"])
                scores[i, j] = float(hit["distance"])
        return scores, rows

    def upsert(self, rows: Sequence[int], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows = list(rows)
        for start in range(0, len(rows), MILVUS_BATCH):
            chunk = [
                {"row": int(row), "vector": vectors[i].tolist()}
                for i, row in enumerate(rows[start : start + MILVUS_BATCH], start)
            ]
            self.client.upsert(self.collection, chunk, timeout=max(self.timeout_s, 60.0))

    def delete(self, rows: Sequence[int]) -> None:
        self.client.delete(self.collection, ids=[int(r) for r in rows], timeout=self.timeout_s)

    def count(self) -> int:
        try:
            result = self.client.query(self.collection, filter="", output_fields=["count(*)"], timeout=self.timeout_s)
        except Exception as exc:
            raise IndexUnavailable(f"Milvus at {self._where()}: count failed: {exc}") from None
        return int(result[0]["count(*)"])

    def _where(self) -> str:
        return self.uri if "://" not in self.uri else self.uri.split("@")[-1]  # no credentials

    def describe(self) -> dict[str, Any]:
        """What /info shows; no network call (the item count is /readyz's check)."""
        return {
            "backend": self.name,
            "type": self.index_type.lower(),
            "uri": self._where(),
            "collection": self.collection,
            "shared": self.shared,
        }

    def close(self) -> None:
        self.client.close()


def collection_name(prefix: str, model_version: str) -> str:
    """One collection per served model: `karma_<model_version>` (vectors of two models never mix)."""
    return f"{prefix}{model_version}".replace("-", "_")
