"""What the `POST /search` fast path (service/fastpath.py) saves: the app called in-process, fast path on vs off.

    python benchmarks/bench_fastpath.py [--bundle artifacts/bundles/default] [--requests 3000] [--rounds 5]

The real app (`create_app`: middleware, batcher, ONNX Runtime, FAISS) is driven through raw ASGI
calls — no sockets, no HTTP client — one request at a time, so the difference between the two modes
is exactly FastAPI's routing, dependency solving and body handling that the fast path skips. Rounds
alternate on/off to share the machine's drift; the table gives the median per-request time of each.
Writes artifacts/benchmarks/fastpath.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from karma.config import ServeConfig
from karma.machine import machine, machine_line
from service.app import create_app
from service.fastpath import FastSearch


async def _call(app: Any, body: bytes) -> int:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/search", "raw_path": b"/search", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def measure(bundle: Path, requests: int, rounds: int) -> dict[str, list[float]]:
    config = ServeConfig(bundle=bundle, redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.2, access_log=False)
    app = create_app(config)
    engine_items: list[str] = []
    per_request: dict[str, list[float]] = {"fast path on": [], "fast path off": []}
    applies = FastSearch.applies
    async with app.router.lifespan_context(app):
        engine_items = app.state.svc.engine.item_ids
        body = json.dumps({"query": "red running shoes", "history": engine_items[3:13], "k": 10}).encode()
        for _ in range(200):  # warm both paths
            await _call(app, body)
        for _ in range(rounds):
            for mode in per_request:
                FastSearch.applies = staticmethod(applies if mode == "fast path on" else lambda scope: False)
                start = time.perf_counter()
                for _ in range(requests):
                    assert await _call(app, body) == 200
                per_request[mode].append((time.perf_counter() - start) / requests * 1000)
    FastSearch.applies = staticmethod(applies)
    return per_request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/bundles/default"))
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("artifacts/benchmarks/fastpath.json"))
    args = parser.parse_args()
    per_request = asyncio.run(measure(args.bundle, args.requests, args.rounds))
    on, off = (statistics.median(per_request[m]) for m in ("fast path on", "fast path off"))
    m = machine()
    print(f"POST /search in-process, one at a time, {args.requests} requests x {args.rounds} rounds per mode")
    print(f"bundle {args.bundle}; {machine_line(m)}")
    print(f"  fast path on : {on:.4f} ms/request (median of rounds)")
    print(f"  fast path off: {off:.4f} ms/request")
    print(f"  saved        : {off - on:.4f} ms/request ({(off - on) / off:.1%} of the request)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"per_request_ms": per_request, "median_on_ms": on, "median_off_ms": off, "machine": m}, indent=2)
    )


if __name__ == "__main__":
    main()
