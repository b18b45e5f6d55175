"""Exact vs approximate FAISS indexes at catalog scale: build time, memory, recall@k vs exact, latency.

Vectors: a synthetic stand-in for item embeddings at the served dimension D: unit vectors drawn
around `clusters` random centres (a Gaussian mixture, normalised), so the data has the cluster
structure that IVF relies on; queries are drawn from the same mixture. (Uniformly random unit
vectors are the worst case for IVF: see DESIGN §8.) The indexes are built by `export.index.build_index`,
exactly as `karma export --index ...` builds them, with the parameters given here.

Per index and search setting: build seconds (train + add), serialized size (what the bundle ships
and the service holds in memory), recall@k of the top-k against the exact top-k (the flat index;
|approx ∩ exact| / k, averaged over queries), and per-query latency at batch 1 (p50/p99 over
`latency_queries` single-query searches). A setting with `rerank` R searches R x k candidates and
re-scores them with the exact vectors (`karma.search.search_top_k`, what the service does with
`serve.rerank_factor`); the exact vectors are the bundle's item embeddings, which the service holds
anyway, so re-ranking adds no memory. FAISS runs with the threads it is given (1 under
OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.stats import percentiles
from karma.search import search_top_k

log = logging.getLogger("karma.bench")


@dataclass
class IndexCase:
    """One index to build, and the search-time settings to measure on it."""

    kind: str  # flat | hnsw | ivfpq
    params: dict[str, int] = field(default_factory=dict)
    search: list[dict[str, int]] = field(default_factory=lambda: [{}])  # e.g. [{"nprobe": 16}, {"nprobe": 64}]


def default_cases(n: int) -> list[IndexCase]:
    """flat; HNSW (M=16, efConstruction=80: a 1M build stays ~minutes on one core); IVF-PQ with
    ~4 dims per sub-quantizer, nlist ~ sqrt(n) (capped at 1024 to keep k-means training short)."""
    nlist = int(min(1024, max(16, 2 ** round(np.log2(np.sqrt(n))))))
    hnsw_search = [{"ef_search": 256}, {"ef_search": 512}, {"ef_search": 256, "rerank": 4}]
    ivfpq_search = [{"nprobe": 16}, {"nprobe": 64}, {"nprobe": 16, "rerank": 4}, {"nprobe": 64, "rerank": 4}]
    return [
        IndexCase("flat"),
        IndexCase("hnsw", {"m": 16, "ef_construction": 80, "ef_search": 256}, hnsw_search),
        IndexCase("ivfpq", {"nlist": nlist, "nbits": 8, "nprobe": 16}, ivfpq_search),
    ]


def mixture(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray, spread: float = 0.6) -> np.ndarray:
    """n unit vectors around random `centres` (rows), in chunks to bound memory."""
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = centres[rng.integers(0, len(centres), m)] + spread * rng.standard_normal((m, dim)).astype(
            np.float32
        ) / np.sqrt(dim)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _set_search(index: Any, setting: dict[str, int]) -> None:
    faiss_index = index
    if "nprobe" in setting:
        faiss_index.nprobe = int(setting["nprobe"])
    if "ef_search" in setting:
        faiss_index.hnsw.efSearch = int(setting["ef_search"])


def _latency(index: Any, vectors: np.ndarray, queries: np.ndarray, k: int, rerank: int) -> dict[str, float]:
    times = []
    for i in range(len(queries)):
        started = time.perf_counter()
        search_top_k(index, vectors, queries[i : i + 1], k, rerank)
        times.append((time.perf_counter() - started) * 1000)
    return percentiles(times)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k (rows of ids; -1 padding never matches)."""
    k = exact.shape[1]
    hits = [len(np.intersect1d(f[f >= 0], e, assume_unique=False)) for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits) / k)


def bench_size(
    n: int,
    dim: int,
    cases: Iterable[IndexCase],
    k: int = 200,
    recall_queries: int = 500,
    latency_queries: int = 200,
    clusters: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Build every case over n synthetic vectors of width dim; one row per (index, search setting)."""
    from export.index import build_index
    from karma.bundle import import_faiss

    faiss = import_faiss()
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = mixture(n, dim, rng, centres)
    queries = mixture(max(recall_queries, latency_queries), dim, rng, centres)
    exact_ids: np.ndarray | None = None
    rows = []
    for case in cases:
        log.info("index bench: %s %s over %s x %d", case.kind, case.params or "", f"{n:,}", dim)
        started = time.perf_counter()
        index, info = build_index(x, case.kind, case.params)
        build_s = time.perf_counter() - started
        size = int(faiss.serialize_index(index).nbytes)
        if case.kind == "flat":
            _, exact_ids = index.search(queries[:recall_queries], k)
        for setting in case.search:
            _set_search(index, setting)
            rerank = int(setting.get("rerank", 1))  # exact re-scoring of rerank x k candidates (the service's)
            _, found = search_top_k(index, x, queries[:recall_queries], k, rerank)
            assert exact_ids is not None, "the flat (exact) case must come first"
            rows.append(
                {
                    "n": n,
                    "dim": dim,
                    "index": case.kind,
                    "faiss_class": info.faiss_class,
                    "params": {**info.params, **setting},
                    "build_s": build_s,
                    "bytes": size,
                    "bytes_per_vector": size / n,
                    f"recall@{k}": recall_at_k(found, exact_ids),
                    "latency_ms": _latency(index, x, queries[:latency_queries], k, rerank),
                    "k": k,
                    "recall_queries": recall_queries,
                    "latency_queries": latency_queries,
                }
            )
        del index
    return rows


def run_index_bench(sizes: Iterable[int], dim: int, **kwargs: Any) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        rows.extend(bench_size(n, dim, default_cases(n), **kwargs))
    return rows
