"""FAISS (in-process) vs Milvus (Milvus Lite, the embedded engine) as `/search`'s index, on one bundle.

    python benchmarks/bench_index_backends.py [--bundle artifacts/bundles/default] [--queries 300] [--items N]

Through the service's own backends (`service/index.py`): top-k agreement of Milvus FLAT with the
FAISS flat index, search latency p50/p99 at batch 1 and 8 (k = 10, 200), upsert throughput into
Milvus and its collection-build time, and bytes per item of each. Milvus Lite runs as a local
server process on the same machine, so its latency includes a gRPC round trip per call. Prints a
table and writes artifacts/benchmarks/index_backends.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from karma.bundle import load_bundle
from karma.machine import machine, machine_line
from service.index import FaissBackend, MilvusBackend


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/bundles/default"))
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--items", type=int, help="Run on a scaled copy with this many items (rows tiled).")
    parser.add_argument(
        "--milvus-index",
        default="FLAT",
        choices=["FLAT", "IVF_FLAT"],
        help="Milvus index (Milvus Lite has these two); IVF_FLAT: nlist = 4 sqrt(N), --nprobe lists.",
    )
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=200, help="Timed searches per row (fewer for 1M FLAT).")
    parser.add_argument("--out", type=Path, default=Path("artifacts/benchmarks/index_backends.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="karma-scaled-") as scaled:
        if args.items:
            from bench_replica_memory import scaled_copy  # a sibling script

            args.bundle = scaled_copy(args.bundle, args.items, Path(scaled), jitter=0.01)
        run(args)


def run(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.bundle)
    embeddings = np.ascontiguousarray(bundle.item_embeddings, dtype=np.float32)
    n, dim = embeddings.shape
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((args.queries, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    faiss = FaissBackend(bundle.index, embeddings)
    report: dict = {"bundle": str(args.bundle), "items": n, "dim": dim, "machine": machine(), "latency_ms": {}}

    def latencies(backend: object, name: str) -> None:
        for batch in (1, 8):
            for k in (10, 200):
                batches = [queries[i : i + batch] for i in range(0, args.queries - batch + 1, batch)]
                it = iter(batches * 10)
                ms = timed(lambda b=backend, k=k, it=it: b.search(next(it), k), min(len(batches), args.repeats))
                report["latency_ms"][f"{name} batch {batch} k {k}"] = {
                    "p50": float(np.percentile(ms, 50)),
                    "p99": float(np.percentile(ms, 99)),
                }

    latencies(faiss, "faiss")  # first: Milvus Lite runs in this process and keeps working after a fill
    with tempfile.TemporaryDirectory(prefix="karma-milvus-") as tmp:
        ivf = args.milvus_index == "IVF_FLAT"
        nlist = int(4 * np.sqrt(n))
        milvus = MilvusBackend(
            str(Path(tmp) / "bench.db"), "bench", dim, args.milvus_index, timeout_s=600,
            index_params={"nlist": nlist} if ivf else None, search_params={"nprobe": args.nprobe} if ivf else None,
        )  # fmt: skip
        report["milvus_index"] = {"type": args.milvus_index, **({"nlist": nlist, "nprobe": args.nprobe} if ivf else {})}
        start = time.perf_counter()
        milvus.ensure(embeddings)
        report["milvus_build_s"] = round(time.perf_counter() - start, 2)
        for k in (10, 200):
            _, f_rows = faiss.search(queries, k)
            _, m_rows = milvus.search(queries, k)
            overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(f_rows, m_rows, strict=True)])
            report[f"milvus_topk_overlap_at_{k}"] = round(float(overlap), 6)
        latencies(milvus, "milvus")
        fresh = rng.standard_normal((2000, dim)).astype(np.float32)
        start = time.perf_counter()
        milvus.upsert(range(n, n + len(fresh)), fresh)
        report["milvus_upserts_per_s"] = round(len(fresh) / (time.perf_counter() - start), 1)
        milvus.close()
    report["bytes_per_item"] = {
        "faiss flat": 4 * dim,
        "milvus FLAT (vector + int64 key, before its own overhead)": 4 * dim + 8,
    }
    print(f"{n:,} items x {dim}, {args.queries} random unit queries; {machine_line(report['machine'])}")
    print(f"Milvus {report['milvus_index']} recall vs exact (FAISS flat top-k): "
          f"@10 {report['milvus_topk_overlap_at_10']:.4f}, "
          f"@200 {report['milvus_topk_overlap_at_200']:.4f}; collection build {report['milvus_build_s']} s; "
          f"upserts {report['milvus_upserts_per_s']:,.0f}/s")  # fmt: skip
    print(f"{'search':<24} {'p50 ms':>8} {'p99 ms':>8}")
    for key, value in report["latency_ms"].items():
        print(f"{key:<24} {value['p50']:8.3f} {value['p99']:8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
