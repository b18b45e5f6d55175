"""The load generator: its own process, raw keep-alive HTTP/1.1 over asyncio, open or closed loop.

    python -m bench.loadgen SPEC.json RESULT.json

SPEC (written by `run_load`):
    targets      base URLs; request i goes to targets[assign(i)] (one target, or A/B interleaved)
    interleave   "abba" (A B B A A B B A ..., so neither side is always first) or "round_robin"
    path         "/search"
    bodies       JSON request bodies, request i sends bodies[i % len(bodies)]
    mode         "open": arrivals at a fixed rate, whatever the responses do (Poisson or uniform
                 inter-arrival times), new connections opened as needed (up to max_connections per
                 target); "closed": `concurrency` requests in flight, each sent when one returns
    rate         open loop: arrivals per second, all targets together
    arrivals     "poisson" | "uniform"
    concurrency  closed loop: requests in flight; open loop: connections opened up front per target
    warmup_s, duration_s   requests sent during the first warmup_s are marked warm-up
    drain_s      after the last send, wait at most this long for outstanding responses (then: status 0)
    seed

RESULT: per request (columns) target, scheduled, sent, done (seconds from the start), HTTP status
(0 = no answer before the drain deadline, -1 = connection error), the response's batch_size and
X-Total-Time; the measured window; and this process's own CPU time (getrusage: user + system
seconds over the run), so every table can state what the load generator itself cost.

Latency is `done - sent`; `sent - scheduled` is the generator's own lag (timer granularity ~1 ms,
more if it cannot keep up), reported beside it. A pooled keep-alive connection that the server has
closed meanwhile (uvicorn closes idle ones after 5 s) is dropped, or, if that is only seen on
sending, the request is resent once on a new connection (latency still counted from the first
send); `stale_connections` counts both. uvloop is used when installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from karma.machine import THREAD_ENV

DEFAULTS: dict[str, Any] = {
    "interleave": "round_robin",
    "path": "/search",
    "mode": "open",
    "rate": 100.0,
    "arrivals": "poisson",
    "concurrency": 8,
    "warmup_s": 1.0,
    "duration_s": 5.0,
    "drain_s": 30.0,
    "max_connections": 1024,
    "seed": 0,
}


def arrival_offsets(rate: float, seconds: float, kind: str, seed: int) -> list[float]:
    """Send times (seconds from the start) of an open-loop run: Poisson or evenly spaced."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if kind == "uniform":
        return [i / rate for i in range(int(seconds * rate))]
    if kind != "poisson":
        raise ValueError(f"arrivals must be poisson or uniform, got {kind!r}")
    rng = random.Random(seed)
    out, t = [], rng.expovariate(rate)
    while t < seconds:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def assign(i: int, n_targets: int, interleave: str) -> int:
    """Target of request i: round robin, or ABBA for two targets (pairs alternate which goes first)."""
    if n_targets == 1:
        return 0
    if interleave == "abba" and n_targets == 2:
        return (i % 2) ^ ((i // 2) % 2)
    return i % n_targets


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.used = 0  # responses read on it

    @property
    def closed_by_peer(self) -> bool:
        """The server closed it while it sat in the pool (e.g. its keep-alive timeout, 5 s in uvicorn)."""
        return self.reader.at_eof() or self.writer.is_closing()

    async def roundtrip(self, payload: bytes) -> tuple[int, int, float]:
        """Send one request, read its response: (status, batch_size or -1, X-Total-Time ms or -1)."""
        self.writer.write(payload)
        head = (await self.reader.readuntil(b"\r\n\r\n")).lower()
        status = int(head[9:12])
        start = head.index(b"\r\ncontent-length:") + 17
        body = await self.reader.readexactly(int(head[start : head.index(b"\r\n", start)]))
        server_ms = -1.0
        at = head.find(b"\r\nx-total-time:")
        if at >= 0:
            at += 15
            server_ms = float(head[at : head.index(b"\r\n", at)])
        batch = -1
        at = body.find(b'"batch_size":')
        if at >= 0:
            at += 13
            end = at
            while end < len(body) and body[end : end + 1].isdigit():
                end += 1
            batch = int(body[at:end] or -1)
        self.used += 1
        return status, batch, server_ms

    def close(self) -> None:
        self.writer.close()


class LoadGenerator:
    def __init__(self, spec: dict[str, Any]):
        self.spec = {**DEFAULTS, **spec}
        self.targets = [urlsplit(t) for t in self.spec["targets"]]
        bodies = [json.dumps(b, separators=(",", ":")).encode() for b in self.spec["bodies"]]
        if not bodies:
            raise ValueError("spec has no request bodies")
        path = self.spec["path"]
        # One ready-to-send request per (target, body): the header and the body in one write.
        self.payloads = [
            [
                f"POST {path} HTTP/1.1\r\nHost: {t.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(b)}\r\n\r\n".encode()
                + b
                for b in bodies
            ]
            for t in self.targets
        ]
        self.pools: list[list[Connection]] = [[] for _ in self.targets]
        self.opened = [0] * len(self.targets)
        self.slots = [asyncio.Semaphore(int(self.spec["max_connections"])) for _ in self.targets]
        self.columns: dict[str, list] = {
            k: [] for k in ("target", "scheduled", "sent", "done", "status", "batch", "server_ms")
        }
        self.t0 = 0.0
        self.stale = 0  # pooled connections found closed by the server (dropped, or the request resent)

    async def _connect(self, which: int) -> Connection:
        url = self.targets[which]
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.opened[which] += 1
        return Connection(reader, writer)

    async def _one(self, i: int, scheduled: float) -> None:
        """Open loop: request i to its target, on a pooled connection."""
        which = assign(i, len(self.targets), self.spec["interleave"])
        async with self.slots[which]:  # open loop: a pooled connection (newest first), or a new one
            pool = self.pools[which]
            while pool and pool[-1].closed_by_peer:
                pool.pop().close()
                self.stale += 1
            conn = await self._send(which, i, scheduled, pool.pop() if pool else None)
            if conn is not None:
                pool.append(conn)

    async def _send(self, which: int, i: int, scheduled: float, conn: Connection | None) -> Connection | None:
        """Send request i on `conn` (None: a new connection, its connect time counted) and record the answer."""
        payload = self.payloads[which][i % len(self.payloads[which])]
        status, batch, server_ms = -1, -1, -1.0
        sent = time.perf_counter() - self.t0
        for attempt in (1, 2):
            try:
                if conn is None:
                    conn = await self._connect(which)
                status, batch, server_ms = await conn.roundtrip(payload)
            except asyncio.CancelledError:  # still unanswered at the drain deadline: recorded as status 0
                status = 0
            except (OSError, asyncio.IncompleteReadError, ValueError):
                if attempt == 1 and conn is not None and conn.used:  # kept alive, but the server closed it
                    conn.close()  # as we sent: resend once on a new one, as HTTP clients do (latency from `sent`)
                    self.stale += 1
                    conn = None
                    continue
            break
        done = time.perf_counter() - self.t0
        c = self.columns
        c["target"].append(which)
        c["scheduled"].append(scheduled)
        c["sent"].append(sent)
        c["done"].append(done)
        c["status"].append(status)
        c["batch"].append(batch)
        c["server_ms"].append(server_ms)
        if status <= 0:
            if conn is not None:
                conn.close()
            return None
        return conn

    async def _open_loop(self, end: float) -> None:
        offsets = arrival_offsets(float(self.spec["rate"]), end, self.spec["arrivals"], int(self.spec["seed"]))
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        for i, offset in enumerate(offsets):
            delay = self.t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(self._one(i, offset))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await self._drain(tasks, end)

    async def _closed_loop(self, end: float) -> None:
        counter = iter(range(10**12))

        async def worker() -> None:
            conns: dict[int, Connection | None] = {}
            try:
                while time.perf_counter() - self.t0 < end:
                    i = next(counter)
                    target = assign(i, len(self.targets), self.spec["interleave"])
                    conns[target] = await self._send(target, i, time.perf_counter() - self.t0, conns.get(target))
            finally:
                for conn in conns.values():
                    if conn is not None:
                        conn.close()

        workers = {asyncio.ensure_future(worker()) for _ in range(int(self.spec["concurrency"]))}
        await self._drain(workers, end)

    async def _drain(self, tasks: set, end: float) -> None:
        """Wait for outstanding requests until drain_s after `end`; cancel the rest (recorded as status 0)."""
        deadline = self.t0 + end + float(self.spec["drain_s"])
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=max(0.0, deadline - time.perf_counter()))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def run(self) -> dict[str, Any]:
        spec = self.spec
        for which in range(len(self.targets)):  # connections up front, so the first requests pay no connect
            for _ in range(min(int(spec["concurrency"]), 64) if spec["mode"] == "open" else 0):
                self.pools[which].append(await self._connect(which))
        warmup, duration = float(spec["warmup_s"]), float(spec["duration_s"])
        usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        self.t0 = time.perf_counter()
        if spec["mode"] == "open":
            await self._open_loop(warmup + duration)
        elif spec["mode"] == "closed":
            await self._closed_loop(warmup + duration)
        else:
            raise ValueError(f"mode must be open or closed, got {spec['mode']!r}")
        wall = time.perf_counter() - wall0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        for pool in self.pools:
            for conn in pool:
                conn.close()
        return {
            "spec": {k: v for k, v in spec.items() if k != "bodies"},
            "n_bodies": len(spec["bodies"]),
            "window_s": [warmup, warmup + duration],
            "records": self.columns,
            "connections_opened": self.opened,
            "stale_connections": self.stale,
            "cpu": {
                "user_s": usage.ru_utime - usage0.ru_utime,
                "system_s": usage.ru_stime - usage0.ru_stime,
                "wall_s": wall,
            },
            "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            "pid": os.getpid(),
        }


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.exit("usage: python -m bench.loadgen SPEC.json RESULT.json")
    spec = json.loads(Path(args[0]).read_text())
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(LoadGenerator(spec).run())
    Path(args[1]).write_text(json.dumps(result, separators=(",", ":")))


def run_load(spec: dict[str, Any], workdir: Path, name: str) -> dict[str, Any]:
    """Run the load generator as its own process on `spec`; returns its result (kept as workdir/name.json)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, **THREAD_ENV}
    budget = float(spec.get("warmup_s", 1)) + float(spec.get("duration_s", 5)) + float(spec.get("drain_s", 30)) + 60
    done = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", str(spec_path), str(out_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=budget,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(out_path.read_text())


if __name__ == "__main__":
    main()
