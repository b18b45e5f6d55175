"""FAISS indexes over the item embeddings (inner product on unit vectors = cosine).

    flat    IndexFlatIP: exact; the default (~2 ms/query at 100k x 64, ~20 ms at 1M, DESIGN §8)
    hnsw    IndexHNSWFlat: graph search; params m, ef_construction, ef_search
    ivfpq   IndexIVFPQ: inverted lists + product quantisation for catalogs beyond memory;
            params nlist, m (sub-quantizers), nbits, nprobe (IVF needs a high nprobe on unclustered data)

Row i of the embeddings is FAISS id i, which is catalog row i (items.parquet). The parameters
actually used (defaults filled in) go into the manifest, and `karma.bundle.load_index` applies the
search-time ones (nprobe, ef_search) when it reads the index back.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from karma.bundle import IndexInfo, import_faiss
from karma.errors import KarmaError

INDEX_TYPES = ("flat", "hnsw", "ivfpq")

_KNOWN_PARAMS = {
    "flat": set(),
    "hnsw": {"m", "ef_construction", "ef_search"},
    "ivfpq": {"nlist", "m", "nbits", "nprobe", "seed"},
}


def default_params(kind: str, n: int, d: int) -> dict[str, Any]:
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"m": 32, "ef_construction": 200, "ef_search": 128}
    if kind == "ivfpq":
        nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))  # >= 39 training points per list
        m = next(k for k in range(max(1, d // 4), 0, -1) if d % k == 0)  # ~4 dims per sub-quantizer
        nbits = max(1, min(8, int(math.log2(max(n // 39, 2)))))  # >= 39 training points per PQ centroid
        return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nlist, 32), "seed": 0}
    raise KarmaError(f"unknown index type {kind!r}; use one of {', '.join(INDEX_TYPES)}")


def parse_index_params(items: list[str]) -> dict[str, int]:
    """`["nlist=64", "nprobe=16"]` -> {"nlist": 64, "nprobe": 16}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise KarmaError(f"index parameter {item!r}: expected KEY=INTEGER, e.g. nprobe=32")
        out[key.strip()] = int(value)
    return out


def build_index(
    embeddings: np.ndarray, kind: str = "flat", params: dict[str, Any] | None = None
) -> tuple[Any, IndexInfo]:
    """Build and fill an inner-product index over (N, D) float32 embeddings."""
    faiss = import_faiss()

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = x.shape
    merged = default_params(kind, n, d)
    unknown = set(params or {}) - _KNOWN_PARAMS[kind]
    if unknown:
        raise KarmaError(f"index {kind}: unknown parameter(s) {sorted(unknown)}; known: {sorted(_KNOWN_PARAMS[kind])}")
    merged.update(params or {})
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(merged["m"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(merged["ef_construction"])
        index.hnsw.efSearch = int(merged["ef_search"])
    else:
        nlist, m, nbits = int(merged["nlist"]), int(merged["m"]), int(merged["nbits"])
        if d % m:
            raise KarmaError(f"index ivfpq: m={m} sub-quantizers must divide the embedding dim {d}")
        if n < max(nlist, 2**nbits):
            raise KarmaError(f"index ivfpq: {n} items are too few to train nlist={nlist}, nbits={nbits}")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(merged["seed"])
        index.pq.cp.seed = int(merged["seed"])
        index.train(x)
        index.nprobe = min(int(merged["nprobe"]), nlist)
    index.add(x)
    info = IndexInfo(type=kind, faiss_class=type(index).__name__, metric="inner_product", params=merged, n_items=n)
    return index, info


def write_index(index: Any, path: Any) -> None:
    faiss = import_faiss()

    faiss.write_index(index, str(path))


def exact_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k in numpy (the reference an index is checked against)."""
    scores = queries @ embeddings.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, axis=1), top
