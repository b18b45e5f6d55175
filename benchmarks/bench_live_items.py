"""Items that arrive live: how fast `POST /items` indexes them, how soon they are served, what they cost searches.

    python benchmarks/bench_live_items.py [--bundle artifacts/bundles/default] [--items 512]

Through the real app in-process (httpx ASGI transport, the real encoders, FAISS and Milvus Lite):

1. upsert throughput: `POST /items` bodies of 1, 16 and 128 items (texts from the catalog, new ids),
   items/s and request p50/p99, on `faiss` and on `milvus` (Milvus Lite, a local server process);
2. time to served: the same replica serves an item when the POST answers (the upsert is synchronous);
   with Milvus a *second* replica serves it once its registry follower applied the change: the lag
   from the POST's answer to the second replica resolving the id (polled every 2 ms), p50/p99;
3. what live items cost a FAISS search: the delta is an exact matrix searched beside the index, so
   `/search` latency grows with the items added since the last export: p50 at 0, 1k and 10k live items.

Prints tables and writes artifacts/benchmarks/live_items.json. Redis must run (serve.redis_url).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.report import save_report
from karma.bundle import load_bundle
from karma.config import ServeConfig
from karma.machine import machine
from service.app import create_app

KEY = "bench-live-items-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if values else float("nan")


async def app_client(config: ServeConfig, stack: Any) -> tuple[Any, httpx.AsyncClient]:
    app = create_app(config)
    await stack.enter_async_context(app.router.lifespan_context(app))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://karma", timeout=120)
    await stack.enter_async_context(client)
    return app, client


def bodies(texts: list[str], fields: list[str], n: int, per: int, tag: str) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    out = []
    for start in range(0, n, per):
        items = []
        for i in range(start, min(n, start + per)):
            text = texts[int(rng.integers(len(texts)))]
            items.append({"item_id": f"{tag}-{i}", "text": {fields[0]: f"{text} (edition {i})"}})
        out.append({"items": items})
    return out


async def upserts(client: httpx.AsyncClient, payloads: list[dict[str, Any]]) -> dict[str, float]:
    ms = []
    started = time.perf_counter()
    for body in payloads:
        t = time.perf_counter()
        r = await client.post("/items", json=body, headers=AUTH)
        r.raise_for_status()
        ms.append((time.perf_counter() - t) * 1000)
    wall = time.perf_counter() - started
    n = sum(len(b["items"]) for b in payloads)
    return {"items": n, "items_per_s": round(n / wall, 1), "request_p50_ms": pct(ms, 50), "request_p99_ms": pct(ms, 99)}


async def search_p50(client: httpx.AsyncClient, items: list[str], n: int = 600) -> float:
    ms = []
    for i in range(n):
        body = {"query": "", "history": items[i % 50 : i % 50 + 5], "k": 10}
        t = time.perf_counter()
        (await client.post("/search", json=body)).raise_for_status()
        ms.append((time.perf_counter() - t) * 1000)
    return pct(ms[100:], 50)  # the first 100 warm the path up


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from contextlib import AsyncExitStack

    bundle = load_bundle(args.bundle, check_graphs=False, with_index=False)
    m = bundle.manifest
    if m.text_encoder is None:
        raise SystemExit(f"{args.bundle} ships no text encoder (exported with --no-text-encoder)")
    fields = m.item_text_fields
    texts = [str(t) for t in bundle.items[fields[0]].tolist()]
    items = [str(i) for i in bundle.items["item_id"].tolist()]
    prefix = f"bench-live-{uuid.uuid4().hex[:8]}-"
    base = {"bundle": args.bundle, "admin_api_key": KEY, "access_log": False, "redis_key_prefix": prefix,
            "bundle_root": Path("/"), "max_upsert_items": 256}  # fmt: skip
    report: dict[str, Any] = {
        "bundle": str(args.bundle),
        "n_items": m.n_items,
        "text_encoder": m.text_encoder.kind,
        "text_block": m.text_encoder.block,
        "machine": machine(),
        "upsert": {},
    }
    with tempfile.TemporaryDirectory(prefix="karma-live-") as tmp:
        for backend in ("faiss", "milvus"):
            extra = {"index_backend": backend, "milvus_uri": str(Path(tmp) / "live.db")}
            async with AsyncExitStack() as stack:
                app, a = await app_client(ServeConfig(**base, **extra), stack)
                before = await search_p50(a, items) if backend == "faiss" else None
                for per in (1, 16, 128):
                    n = min(args.items, 64) if per == 1 else args.items
                    got = await upserts(a, bodies(texts, fields, n, per, f"{backend}-{per}"))
                    report["upsert"][f"{backend} x{per}"] = got
                    print(f"{backend:6s} {per:4d} items/request: {got}")
                if backend == "milvus":  # a second replica: how soon does it serve what the first added?
                    _, b = await app_client(ServeConfig(**base, **extra), stack)
                    lags = []
                    for i in range(args.lag_samples):
                        item = f"lag-{i}"
                        r = await a.post("/items", json={"items": [{"item_id": item, "text": texts[i]}]}, headers=AUTH)
                        r.raise_for_status()
                        answered = time.perf_counter()
                        while True:
                            r = await b.post("/embed", json={"item_ids": [item]})
                            if r.status_code == 200:
                                break
                            await asyncio.sleep(0.002)
                        lags.append((time.perf_counter() - answered) * 1000)
                    report["second_replica_lag_ms"] = {"p50": pct(lags, 50), "p99": pct(lags, 99), "n": len(lags)}
                    print(f"second replica serves a new item after p50 {pct(lags, 50)} ms, p99 {pct(lags, 99)} ms")
                else:  # what the FAISS delta costs a search
                    engine = app.state.svc.engine
                    curve = {"0": before}
                    print(f"faiss search p50 with 0 live items: {before} ms")
                    for live in (1000, 10000):
                        have = int(engine.index.describe()["live_vectors"])
                        if live > have:
                            await upserts(a, bodies(texts, fields, live - have, 256, f"delta-{live}"))
                        have = int(engine.index.describe()["live_vectors"])
                        curve[str(have)] = await search_p50(a, items)
                        print(f"faiss search p50 with {have} live items: {curve[str(have)]} ms")
                    report["faiss_search_p50_ms_by_live_items"] = curve
    return report


def delta_search_cost(bundle_dir: Path, queries: int = 300) -> dict[str, dict[str, float]]:
    """FaissBackend.search alone (batch 1) as live items pile up in its delta: the delta is brute-forced."""
    from service.index import FaissBackend

    bundle = load_bundle(bundle_dir, check_graphs=False)
    embeddings = np.ascontiguousarray(bundle.item_embeddings, dtype=np.float32)
    backend = FaissBackend(bundle.index, embeddings)
    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    q = unit(rng.standard_normal((queries, embeddings.shape[1])))
    out: dict[str, dict[str, float]] = {}
    n = len(embeddings)
    for live in (0, 1000, 10000, 100000):
        have = backend.describe()["live_vectors"]
        if live > have:
            backend.upsert(range(n + have, n + live), unit(rng.standard_normal((live - have, q.shape[1]))))
        for k in (10, 200):
            ms = []
            for row in q:
                t = time.perf_counter()
                backend.search(row[None], k)
                ms.append((time.perf_counter() - t) * 1000)
            out[f"live {live} k {k}"] = {"p50": pct(ms[30:], 50), "p99": pct(ms[30:], 99)}
            print(f"FaissBackend.search, {live:>6} live items, k {k:>3}: p50 {pct(ms[30:], 50)} ms")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/bundles/default"))
    parser.add_argument("--items", type=int, default=512, help="Items per upsert configuration.")
    parser.add_argument("--lag-samples", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("artifacts/benchmarks/live_items.json"))
    args = parser.parse_args()
    report = asyncio.run(run(args))
    report["faiss_delta_search_ms"] = delta_search_cost(args.bundle)
    save_report(report, args.out)


if __name__ == "__main__":
    main()
