"""Where a request's time goes inside the server at low load (`karma bench --parts stages`).

One request in flight, sequential `POST /search` bodies (the benchmark's, history in the body) over
one keep-alive connection (`RawClient`: header and body in one write, as proxies send them), to
`karma serve` as configured by default. Each answer's `timings_ms` names the server's stages
(history, featurize, queue, encode, search, total); `overhead` = total - encode - search is what the
HTTP stack, JSON, validation, featurisation and the hand-offs cost. Reported: p50/p90/p99/mean per
stage and the median of overhead / total (the share of a request outside the model and the index).
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import numpy as np

from bench.stats import percentiles

STAGES = ("history", "featurize", "queue", "encode", "search", "total", "overhead", "client")


class RawClient:
    """A minimal keep-alive HTTP/1.1 client that sends each request (headers + body) in one write.

    That is how most clients and every buffering proxy in front of a service send a small POST.
    httpx writes the headers and the body separately, so the server's clock (which starts at the
    first byte) also counts the gap until the client's second write (~0.1 ms here): `--client
    httpx` shows that.
    """

    def __init__(self, base: str):
        url = httpx.URL(base)
        self.host = f"{url.host}:{url.port}"
        self.sock = socket.create_connection((url.host, url.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        body = json.dumps(payload).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head_bytes, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length")
        while len(rest) < length:
            rest += self._recv()
        self.buffer = rest[length:]
        return status, json.loads(rest[:length])

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def time_requests(client: Any, bodies: list[dict], n: int, start: int = 0) -> list[dict[str, float]]:
    """`n` sequential /search calls (bodies cycled from `start`): each answer's timings_ms + client ms."""
    rows = []
    for i in range(n):
        t0 = time.perf_counter()
        status, got = client.post("/search", bodies[(start + i) % len(bodies)])
        client_ms = (time.perf_counter() - t0) * 1000
        if status != 200:
            raise RuntimeError(f"/search answered {status}: {got}")
        t = got["timings_ms"]
        rows.append({**t, "client": client_ms, "overhead": t["total"] - t["encode"] - t["search"],
                     "b": got["batch_size"]})  # fmt: skip
    return rows


def summarize_stages(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Per-stage percentiles and the share of the request outside encode + search."""
    stages = {s: percentiles([r.get(s, 0.0) for r in rows], (50, 90, 99)) for s in STAGES}
    shares = [r["overhead"] / r["total"] for r in rows if r["total"] > 0]
    return {
        "requests": len(rows),
        "stages_ms": stages,
        "overhead_share_p50": round(float(np.median(shares)), 4),
        "batch_size_max": max(r["b"] for r in rows),
    }


def run_stages(base: str, bodies: list[dict], requests: int, warmup: int = 50) -> dict[str, Any]:
    """Time `requests` sequential searches against the server at `base` after `warmup` untimed ones."""
    client = RawClient(base)
    try:
        time_requests(client, bodies, warmup)
        rows = time_requests(client, bodies, requests, start=warmup)
    finally:
        client.close()
    return summarize_stages(rows)
