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
    """The bundle's FAISS index, searched in-process (re-ranked with exact embeddings when approximate), plus a
    delta for live changes: vectors upserted since start in a small exact matrix searched beside the index, and
    bundle rows deleted or replaced hidden from it. The delta lives in this replica's memory only."""

    name = "faiss"
    shared = False

    def __init__(self, index: Any, embeddings: np.ndarray, rerank_factor: int = 1, index_type: str = "flat"):
        self.index = index
        self.embeddings = embeddings
        self.rerank_factor = rerank_factor
        self.index_type = index_type
        self.n_base = int(index.ntotal)
        dim = int(embeddings.shape[1]) if embeddings.ndim == 2 else int(index.d)
        # The delta (every call runs on the encode thread, so it is plain mutable state): live rows and their
        # vectors in slots 0..n-1 of growing arrays, a row -> slot map, and the bundle rows hidden from the index.
        self._rows = np.zeros(0, np.int64)
        self._vectors = np.zeros((0, dim), np.float32)
        self._n = 0
        self._slot_of: dict[int, int] = {}
        self._hidden: set[int] = set()
        self._hidden_rows = np.zeros(0, np.int64)

    @property
    def _delta(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._rows[: self._n], self._vectors[: self._n], self._hidden_rows

    def _hide(self, rows: np.ndarray) -> None:
        base = [int(r) for r in rows if r < self.n_base and int(r) not in self._hidden]
        if base:
            self._hidden.update(base)
            self._hidden_rows = np.fromiter(sorted(self._hidden), dtype=np.int64, count=len(self._hidden))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        rows_live, vectors_live, hidden = self._delta
        if not len(rows_live) and not len(hidden):
            return search_top_k(self.index, self.embeddings, queries, k, self.rerank_factor)
        # The index may return hidden rows: ask for a few more (never more than 2k + 64 at first, however many
        # rows are hidden), drop them, and ask again with twice as many while a query is left short of k.
        want = min(k + min(len(hidden), k + 64), self.n_base)
        while True:
            scores, rows = search_top_k(self.index, self.embeddings, queries, want, self.rerank_factor)
            if not len(hidden):
                break
            gone = np.isin(rows, hidden)
            scores = np.where(gone, -np.inf, scores)
            rows = np.where(gone, -1, rows)
            if want >= self.n_base or int((rows >= 0).sum(axis=1).min()) >= min(k, self.n_base - len(hidden)):
                break
            want = min(2 * want, self.n_base)
        if len(rows_live):
            live_scores = (np.ascontiguousarray(queries, dtype=np.float32) @ vectors_live.T).astype(np.float32)
            live_rows = np.broadcast_to(rows_live, live_scores.shape)
            if live_scores.shape[1] > k:  # only the delta's own top k can make the answer: select before merging
                part = np.argpartition(-live_scores, k - 1, axis=1)[:, :k]
                live_scores = np.take_along_axis(live_scores, part, axis=1)
                live_rows = rows_live[part]
            scores = np.concatenate([scores, live_scores], axis=1)
            rows = np.concatenate([rows, live_rows], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(scores, order, axis=1)
        top_rows = np.take_along_axis(rows, order, axis=1)
        top_rows = np.where(np.isfinite(top_scores), top_rows, -1)
        if top_scores.shape[1] < k:  # fewer candidates than k: pad like FAISS
            pad = k - top_scores.shape[1]
            top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            top_rows = np.pad(top_rows, ((0, 0), (0, pad)), constant_values=-1)
        return top_scores, top_rows

    def upsert(self, rows: Sequence[int], vectors: np.ndarray) -> None:
        """Rows past the bundle's join the delta; a bundle row is hidden from the index and its new vector joins
        it. O(rows written): the arrays grow by doubling, nothing is copied per call."""
        rows = np.asarray(list(rows), dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        fresh = sum(1 for r in dict.fromkeys(rows.tolist()) if r not in self._slot_of)
        if self._n + fresh > len(self._rows):
            size = max(16, 2 * (self._n + fresh))
            grown_rows = np.zeros(size, np.int64)
            grown_rows[: self._n] = self._rows[: self._n]
            grown_vectors = np.zeros((size, self._vectors.shape[1]), np.float32)
            grown_vectors[: self._n] = self._vectors[: self._n]
            self._rows, self._vectors = grown_rows, grown_vectors
        for row, vector in zip(rows.tolist(), vectors, strict=True):
            slot = self._slot_of.get(row)
            if slot is None:
                slot = self._slot_of[row] = self._n
                self._rows[slot] = row
                self._n += 1
            self._vectors[slot] = vector
        self._hide(rows)

    def delete(self, rows: Sequence[int]) -> None:
        """Live rows leave the delta (the last slot moves into the hole); bundle rows are hidden from the index."""
        rows = np.asarray(list(rows), dtype=np.int64)
        for row in rows.tolist():
            slot = self._slot_of.pop(row, None)
            if slot is None:
                continue
            last = self._n - 1
            if slot != last:
                moved = int(self._rows[last])
                self._rows[slot], self._vectors[slot] = moved, self._vectors[last]
                self._slot_of[moved] = slot
            self._n = last
        self._hide(rows)

    def count(self) -> int:
        rows_live, _, hidden = self._delta
        return (
            self.n_base
            - len(hidden)
            + int(np.count_nonzero(rows_live >= self.n_base))
            + int(np.count_nonzero(np.isin(rows_live, hidden)))
        )

    def describe(self) -> dict[str, Any]:
        rows_live, _, hidden = self._delta
        return {
            "backend": self.name,
            "type": self.index_type,
            "items": self.count(),
            "shared": self.shared,
            "live_vectors": len(rows_live),
            "hidden_bundle_rows": len(hidden),
            "note": "changes from POST /items and DELETE /items are held by this replica only and lost on restart",
        }


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
        index_params: dict[str, Any] | None = None,
        search_params: dict[str, Any] | None = None,
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
        self.index_params = index_params or {}  # e.g. {"nlist": 1024} for IVF_FLAT (Milvus's defaults otherwise)
        self.search_params = search_params or {}  # e.g. {"nprobe": 32}
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
            # a fill that stopped midway left no marker; a complete one may hold fewer rows (items deleted live)
            if not client.has_collection(self.filled_marker):
                if self.count() < len(embeddings):
                    log.warning("Milvus collection %s is short of the bundle's %d items: topping it up",
                                self.collection, len(embeddings))  # fmt: skip
                    wrote = True
                else:  # complete (filled before the marker existed): mark it, so live deletes are never undone
                    client.create_collection(self.filled_marker, dimension=2)
        else:
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("row", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            params = client.prepare_index_params()
            params.add_index(
                field_name="vector", index_type=self.index_type, metric_type="IP", params=self.index_params
            )
            client.create_collection(self.collection, schema=schema, index_params=params)
            wrote = True
        if wrote:
            started = time.perf_counter()
            self.upsert(range(len(embeddings)), embeddings)
            client.flush(self.collection)  # seal the segments so searches do not scan a growing one
            client.load_collection(self.collection)
            if not client.has_collection(self.filled_marker):
                client.create_collection(self.filled_marker, dimension=2)  # "the bundle's rows are all in"
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
                search_params={"metric_type": "IP", "params": self.search_params},
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
            try:
                self.client.upsert(self.collection, chunk, timeout=max(self.timeout_s, 60.0))
            except Exception as exc:
                raise IndexUnavailable(f"Milvus at {self._where()}: upsert failed: {exc}") from None

    def delete(self, rows: Sequence[int]) -> None:
        try:
            self.client.delete(self.collection, ids=[int(r) for r in rows], timeout=self.timeout_s)
        except Exception as exc:
            raise IndexUnavailable(f"Milvus at {self._where()}: delete failed: {exc}") from None

    def count(self) -> int:
        try:
            result = self.client.query(self.collection, filter="", output_fields=["count(*)"], timeout=self.timeout_s)
        except Exception as exc:
            raise IndexUnavailable(f"Milvus at {self._where()}: count failed: {exc}") from None
        return int(result[0]["count(*)"])

    @property
    def filled_marker(self) -> str:
        """An empty collection whose existence says the bundle's fill completed (top-ups never resurrect deletes)."""
        return f"{self.collection}__filled"

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
            "note": "changes from POST /items and DELETE /items reach every replica (ids and features via Redis)",
        }

    def close(self) -> None:
        self.client.close()


def collection_name(prefix: str, model_version: str) -> str:
    """One collection per served model: `karma_<model_version>` (vectors of two models never mix)."""
    return f"{prefix}{model_version}".replace("-", "_")
