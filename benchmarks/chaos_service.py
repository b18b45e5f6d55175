"""Chaos and overload drills against a real `karma serve`: what the hardening issue promised, measured.

    python benchmarks/chaos_service.py [--bundle DIR] [--out artifacts/chaos] [--only storm,reload,...]

Scenarios (each on a fresh server process over the bundle, default `artifacts/bundles/default` from
`./run demo`; Redis from TEST_REDIS_URL or 127.0.0.1:6379, and a throwaway `redis-server`
for the restart drill):

- reload-heavy: reload to copies of the bundle whose manifest says max_history 1024 / 4096
  (re-signed, so only the value is hostile) while 4 clients search; the server's peak RSS, the
  reload's answer, failed searches, and that a reload back still works (the lock was released).
- reload-memory-stop: the same 4096 bundle with a token budget that allows it but a small memory
  budget: the warm-up is stopped and the bundle refused.
- sigterm-during-reload: SIGTERM 1 s into a long reload: seconds until the process is gone.
- retry-storm: the knee (closed loop, no retries) and then 512 / 1024 connections that resend every
  429/503 at once: goodput (200s per second) against the knee.
- heavy-k: 28 light clients (k=10) alone, then beside 4 clients asking k=1000: the light ones'
  throughput cut (it was 71% when a batch searched with its largest k).
- slow-clients: 1,000 connections that never finish their request head and 1,000 that never
  finish their body, while 200 normal searches run: how many of those succeed, the in-flight gauge,
  and how many stalled connections are still open after the timeouts.
- upload-at-shutdown: stalled uploads when SIGTERM arrives get a typed 503, not a bare 500.
- redis: clients post clicks with event ids and retry every non-200 with the same id while Redis
  freezes twice and drops every connection twice: clicks lost and doubled.
- redis-restart: Redis killed and restarted twice under a stream of clicks, then 45 s more: 503s
  after it is back (every pooled connection used to fail once, ~40 s later).

Prints one table and writes `chaos.json`. The load generator runs on the same machine as the
server (2 cores here), which the table's notes say.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.loadgen import Connection  # noqa: E402
from karma.bundle import MANIFEST_FILE, load_bundle  # noqa: E402
from karma.machine import (  # noqa: E402
    THREAD_ENV,
    cpu_model,
    usable_cores,
)
from service.launcher import LocalRedis, delete_prefix, free_port, long_history_copy, wait_ready  # noqa: E402
from service.loadguard import _PAGE  # noqa: E402

SERVER_REPO = Path(os.environ.get("CHAOS_SERVER_REPO", REPO))  # another checkout's server, to compare
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
KEY = "chaos-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEAD = b"POST /search HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"


class Server:
    """`karma serve` as a child process we can measure (RSS) and signal."""

    def __init__(self, bundle: Path, sets: list[str], redis_url: str = REDIS_URL):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.prefix = f"karma-chaos-{uuid.uuid4().hex[:10]}-"
        self.redis_url = redis_url
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115  (closed in stop)
        command = [
            sys.executable, "-m", "recipes.cli", "serve", "--bundle", str(bundle), "--port", str(self.port),
            "--set", f"serve.redis_url={redis_url}", "--set", f"serve.redis_key_prefix={self.prefix}",
            "--set", "serve.access_log=false", "--set", "serve.bundle_root=/", *[a for s in sets for a in ("--set", s)],
        ]  # fmt: skip
        env = {**os.environ, **THREAD_ENV, "KARMA_SERVE__ADMIN_API_KEY": KEY}
        self.proc = subprocess.Popen(command, cwd=SERVER_REPO, env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        wait_ready(self.proc, self.base, 120, self.stderr)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/statm", "rb") as f:
                return int(f.read().split()[1]) * _PAGE / 2**20
        except (OSError, ValueError):
            return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        delete_prefix(self.redis_url, self.prefix)
        self.log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PeakRss:
    """Poll a server's RSS every 20 ms in a thread; `.peak` in MiB."""

    def __init__(self, server: Server):
        self.server, self.peak, self._stop = server, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.server.rss_mb())

    def __enter__(self) -> PeakRss:
        self.peak = self.server.rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def search_bodies(bundle: Path) -> list[dict[str, Any]]:
    items = load_bundle(bundle, check_graphs=False, with_index=False).items["item_id"].astype(str).tolist()
    return [
        {"query": "red running shoes", "history": items[3:9], "k": 10},
        {"query": "", "history": items[100:140], "k": 10},
        {"query": "gift mug", "k": 10},
    ]


def raw_request(body: dict[str, Any], path: str = "/search") -> bytes:
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    return head.encode() + data


def row(scenario: str, statuses: Counter, **fields: Any) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "requests": sum(statuses.values()),
        "status": dict(sorted(statuses.items())),
        **fields,
    }


# ---- reload ---------------------------------------------------------------------------------------------------


async def _search_while(base: str, bodies: list[dict[str, Any]], stop: asyncio.Event, clients: int = 4) -> Counter:
    statuses: Counter = Counter()

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            n = 0
            while not stop.is_set():
                try:
                    statuses[(await c.post("/search", json=bodies[(i + n) % len(bodies)])).status_code] += 1
                except httpx.HTTPError:
                    statuses["error"] += 1
                n += 1

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    await stop.wait()
    await asyncio.gather(*tasks)
    return statuses


async def _reload_under_load(server: Server, target: Path, back: Path, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    stop = asyncio.Event()
    load = asyncio.create_task(_search_while(server.base, bodies, stop))
    async with httpx.AsyncClient(base_url=server.base, timeout=600) as c:
        with PeakRss(server) as rss:
            began = time.perf_counter()
            answer = await c.post("/admin/reload", json={"bundle": str(target)}, headers=AUTH)
            seconds = time.perf_counter() - began
        stop.set()
        statuses = await load
        back_answer = await c.post("/admin/reload", json={"bundle": str(back)}, headers=AUTH)
    body = answer.json()
    return {
        "reload": f"{answer.status_code} {body.get('type', 'ok')}",
        "reload_s": round(seconds, 2),
        "peak_rss_mb": round(rss.peak),
        "searches": statuses,
        "reload_back": back_answer.status_code,
        "message": body.get("error", "")[-160:],
    }


def scenario_reload(bundle: Path, work: Path) -> list[dict[str, Any]]:
    rows = []
    bodies = search_bodies(bundle)
    cases = [
        ("reload-heavy 1024", 1024, []),
        ("reload-heavy 4096", 4096, []),
        ("reload-memory-stop 4096", 4096, ["serve.max_batch_tokens=65536", "serve.load_memory_budget_mb=256"]),
    ]
    for name, length, sets in cases:
        target = long_history_copy(bundle, length, work)
        with Server(bundle, sets) as server:
            base_rss = server.rss_mb()
            out = asyncio.run(_reload_under_load(server, target, bundle, bodies))
            statuses = out.pop("searches")
            failed = sum(v for k, v in statuses.items() if k != 200)
            rows.append(row(name, statuses, failed=failed, rss_before_mb=round(base_rss), **out))
            print(f"  {name}: {rows[-1]}", flush=True)
    return rows


def scenario_sigterm(bundle: Path, work: Path) -> list[dict[str, Any]]:
    target = long_history_copy(bundle, 4096, work)
    # A budget that lets the warm-up run long (batch 8 of 4113 tokens), so SIGTERM lands mid-run.
    sets = ["serve.max_batch_tokens=32904", "serve.load_memory_budget_mb=16384", "serve.drain_timeout_s=2"]
    with Server(bundle, sets) as server:

        async def go() -> tuple[float, int | str]:
            async with httpx.AsyncClient(base_url=server.base, timeout=120) as c:
                reload = asyncio.create_task(c.post("/admin/reload", json={"bundle": str(target)}, headers=AUTH))
                await asyncio.sleep(1.0)
                sent = time.perf_counter()
                server.proc.send_signal(signal.SIGTERM)
                while server.proc.poll() is None and time.perf_counter() - sent < 60:
                    await asyncio.sleep(0.02)
                exited = time.perf_counter() - sent
                try:
                    status: int | str = (await reload).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                return exited, status

        exited, status = asyncio.run(go())
        traceback = "Traceback" in server.stderr()
    out = row("sigterm-during-reload 4096", Counter({status: 1}), exit_s=round(exited, 2), drain_timeout_s=2.0)
    out["traceback_in_log"] = traceback
    print(f"  {out}", flush=True)
    return [out]


# ---- retry storm ------------------------------------------------------------------------------------------------


async def _storm(base: str, payloads: list[bytes], connections: int, seconds: float, retry: bool) -> dict[str, Any]:
    host, port = base.removeprefix("http://").split(":")
    statuses: Counter = Counter()
    ok_latency: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(i: int) -> None:
        conn: Connection | None = None
        n = i
        while time.perf_counter() < deadline:
            try:
                if conn is None or conn.closed_by_peer:
                    conn = Connection(*await asyncio.open_connection(host, int(port)))
                began = time.perf_counter()
                while True:  # an impatient client: resend a refused request at once
                    status, _, _ = await conn.roundtrip(payloads[n % len(payloads)])
                    statuses[status] += 1
                    if status == 200 or not retry or time.perf_counter() >= deadline:
                        break
                if status == 200:
                    ok_latency.append(time.perf_counter() - began)
                n += 1
            except (OSError, asyncio.IncompleteReadError, ValueError):
                statuses["conn_error"] += 1
                conn = None
                await asyncio.sleep(0.01)

    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(connections)))
    window = time.perf_counter() - began
    ok_latency.sort()
    pct = lambda q: round(ok_latency[int(q * (len(ok_latency) - 1))] * 1000, 1) if ok_latency else None  # noqa: E731
    return {
        "statuses": statuses,
        "goodput_rps": round(statuses[200] / window, 1),
        "tries_rps": round(sum(statuses.values()) / window, 1),
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
    }


def scenario_storm(bundle: Path, seconds: float) -> list[dict[str, Any]]:
    """The knee, then retry storms on the defaults and on two admission settings for contrast."""
    payloads = [raw_request(b) for b in search_bodies(bundle)]
    rows = []
    knee = 0.0
    with Server(bundle, []) as server:
        for connections in (16, 32, 64):
            out = asyncio.run(_storm(server.base, payloads, connections, seconds, retry=False))
            knee = max(knee, out["goodput_rps"])
            rows.append(row(f"closed loop {connections} conns", out.pop("statuses"), **out))
            print(f"  {rows[-1]}", flush=True)
        for connections in (512, 1024):
            out = asyncio.run(_storm(server.base, payloads, connections, seconds, retry=True))
            share = round(out["goodput_rps"] / knee, 3) if knee else None
            rows.append(row(f"retry storm {connections} conns", out.pop("statuses"), goodput_vs_knee=share, **out))
            print(f"  {rows[-1]}", flush=True)
    contrasts = [
        ("refuse at once (admission_wait_s=0)", ["serve.admission_wait_s=0"]),
        ("small waiting room (max_waiting_requests=256)", ["serve.max_waiting_requests=256"]),
    ]
    for name, sets in contrasts:
        with Server(bundle, sets) as server:
            out = asyncio.run(_storm(server.base, payloads, 1024, seconds, retry=True))
        share = round(out["goodput_rps"] / knee, 3) if knee else None
        rows.append(row(f"retry storm 1024 conns, {name}", out.pop("statuses"), goodput_vs_knee=share, **out))
        print(f"  {rows[-1]}", flush=True)
    return rows


def scenario_heavy_k(bundle: Path, seconds: float) -> list[dict[str, Any]]:
    """28 light clients (k=10) alone, then beside 4 heavy ones (k=1000): what the heavy ones cost them."""
    light = [raw_request(b) for b in search_bodies(bundle)]
    heavy = [raw_request({**b, "k": 1000}) for b in search_bodies(bundle)]
    rows = []
    with Server(bundle, []) as server:
        alone = asyncio.run(_storm(server.base, light, 28, seconds, retry=False))

        async def mixed() -> tuple[dict[str, Any], dict[str, Any]]:
            return await asyncio.gather(
                _storm(server.base, light, 28, seconds, retry=False),
                _storm(server.base, heavy, 4, seconds, retry=False),
            )

        beside, heavy_out = asyncio.run(mixed())
    cut = round(1 - beside["goodput_rps"] / alone["goodput_rps"], 3)
    rows.append(row("28 light clients alone (k=10)", alone.pop("statuses"), **alone))
    rows.append(
        row("28 light clients beside 4 with k=1000", beside.pop("statuses"), light_throughput_cut=cut, **beside)
    )
    rows.append(row("  the 4 heavy clients (k=1000)", heavy_out.pop("statuses"), **heavy_out))
    for r in rows:
        print(f"  {r}", flush=True)
    return rows


# ---- slow clients ------------------------------------------------------------------------------------------------


async def _slow_clients(server: Server, bodies: list[dict[str, Any]], stalled: int, timeout_s: float) -> dict[str, Any]:
    host, port = "127.0.0.1", server.port
    heads, uploads = [], []
    for _ in range(stalled):
        r, w = await asyncio.open_connection(host, port)
        w.write(b"POST /search HTTP/1.1\r\nhost: x\r\ncontent-ty")  # never finishes the head
        heads.append((r, w))
    for _ in range(stalled):
        r, w = await asyncio.open_connection(host, port)
        w.write(b'POST /search HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"q')
        uploads.append((r, w))
    await asyncio.sleep(0.5)
    async with httpx.AsyncClient(base_url=server.base, timeout=30) as c:
        in_flight = _gauge((await c.get("/metrics")).text, "karma_in_flight_requests")
        results = await asyncio.gather(
            *(c.post("/search", json=bodies[i % len(bodies)]) for i in range(200)), return_exceptions=True
        )
        statuses = Counter(r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in results)
        await asyncio.sleep(timeout_s + 1.5)
        after = _gauge((await c.get("/metrics")).text, "karma_in_flight_requests")

    async def still_open(r: asyncio.StreamReader) -> tuple[bool, bytes]:
        try:
            data = await asyncio.wait_for(r.read(4096), 0.2)
            return False, data
        except TimeoutError:
            return True, b""

    head_state = [await still_open(r) for r, _ in heads]
    upload_state = [await still_open(r) for r, _ in uploads]
    for _, w in heads + uploads:
        w.close()
    return {
        "searches": statuses,
        "in_flight_during": in_flight,
        "in_flight_after": after,
        "heads_open_after": sum(o for o, _ in head_state),
        "uploads_open_after": sum(o for o, _ in upload_state),
        "uploads_408": sum(b" 408 " in d[:16] for _, d in upload_state),
    }


def _gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def scenario_slow(bundle: Path) -> list[dict[str, Any]]:
    timeout = 3.0
    sets = [f"serve.header_timeout_s={timeout}", f"serve.body_timeout_s={timeout}"]
    with Server(bundle, sets) as server:
        out = asyncio.run(_slow_clients(server, search_bodies(bundle), 1000, timeout))
    result = row("slow clients 1000 heads + 1000 uploads", out.pop("searches"), timeouts_s=timeout, **out)
    print(f"  {result}", flush=True)
    return [result]


def scenario_upload_shutdown(bundle: Path) -> list[dict[str, Any]]:
    with Server(bundle, ["serve.drain_timeout_s=1", "serve.body_timeout_s=30"]) as server:

        async def go() -> tuple[Counter, float]:
            conns = []
            for _ in range(10):
                r, w = await asyncio.open_connection("127.0.0.1", server.port)
                w.write(HEAD + b"content-length: 50\r\n\r\n{")
                conns.append((r, w))
            await asyncio.sleep(0.3)
            sent = time.perf_counter()
            server.proc.send_signal(signal.SIGTERM)
            answers: Counter = Counter()
            for r, _ in conns:
                try:
                    data = await asyncio.wait_for(r.read(4096), 30)
                    with contextlib.suppress(TimeoutError):  # the body may come in a second packet
                        data += await asyncio.wait_for(r.read(4096), 1)
                    answers[data[9:12].decode() + (" shutting_down" if b"shutting_down" in data else "")] += 1
                except (TimeoutError, OSError):
                    answers["none"] += 1
            while server.proc.poll() is None and time.perf_counter() - sent < 30:
                await asyncio.sleep(0.02)
            return answers, time.perf_counter() - sent

        answers, exited = asyncio.run(go())
        traceback = "Traceback" in server.stderr()
    out = row("stalled uploads at SIGTERM", answers, exit_s=round(exited, 2), traceback_in_log=traceback)
    print(f"  {out}", flush=True)
    return [out]


# ---- Redis restarts ------------------------------------------------------------------------------------------------


def scenario_redis(bundle: Path) -> list[dict[str, Any]]:
    """Clients retry every unanswered click with its event id while Redis freezes (SIGSTOP 1.5 s, the
    "503 for a click that was stored" case) and drops every connection (CLIENT KILL, what a restart
    does to the pool, without losing the data): per user, stored clicks must equal clicks sent."""
    import redis

    items = load_bundle(bundle, check_graphs=False, with_index=False).items["item_id"].astype(str).tolist()
    sets = ["serve.redis_timeout_s=0.3", "serve.history_max_events=100000"]
    with LocalRedis() as local, Server(bundle, sets, redis_url=local.url) as server:
        admin = redis.Redis.from_url(local.url)

        async def go() -> tuple[Counter, dict[str, int]]:
            statuses: Counter = Counter()
            sent: dict[str, int] = {}
            stop = asyncio.Event()

            async def client(u: int) -> None:
                async with httpx.AsyncClient(base_url=server.base, timeout=10) as c:
                    n = 0
                    while not stop.is_set():
                        body = {"user_id": f"user-{u}", "item_id": items[n % len(items)], "event_id": f"u{u}-e{n}"}
                        while True:  # retry with the same id until the service says it has it
                            try:
                                answer = await c.post("/events", json=body)
                                statuses[answer.status_code] += 1
                                if answer.status_code == 200:
                                    break
                            except httpx.HTTPError:
                                statuses["error"] += 1
                            await asyncio.sleep(0.05)
                        n += 1
                        sent[f"user-{u}"] = n

            tasks = [asyncio.create_task(client(u)) for u in range(8)]
            for _ in range(2):
                await asyncio.sleep(1.0)
                local.freeze()
                await asyncio.sleep(1.5)
                local.thaw()
                await asyncio.sleep(1.0)
                admin.client_kill_filter(_type="normal", skipme=True)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*tasks)
            return statuses, sent

        statuses, sent = asyncio.run(go())
        stored = {u: int(admin.llen(f"{server.prefix}hist:{u}")) for u in sent}
    out = row(
        "clicks with event ids: Redis frozen x2 + connections killed x2",
        statuses,
        clicks=sum(sent.values()),
        stored=sum(stored.values()),
        lost=sum(max(0, sent[u] - stored[u]) for u in sent),
        doubled=sum(max(0, stored[u] - sent[u]) for u in sent),
    )
    print(f"  {out}", flush=True)
    return [out]


def scenario_redis_restart(bundle: Path) -> list[dict[str, Any]]:
    """Redis killed and restarted twice under a steady stream of clicks: 503s once it is back (goal 0)."""
    items = load_bundle(bundle, check_graphs=False, with_index=False).items["item_id"].astype(str).tolist()
    with LocalRedis() as local, Server(bundle, ["serve.redis_timeout_s=0.3"], redis_url=local.url) as server:

        async def go() -> tuple[list[tuple[float, int]], list[float]]:
            log: list[tuple[float, int]] = []
            back: list[float] = []
            stop = asyncio.Event()

            async def client(u: int) -> None:
                async with httpx.AsyncClient(base_url=server.base, timeout=10) as c:
                    n = 0
                    while not stop.is_set():
                        sent = time.perf_counter()
                        body = {"user_id": f"user-{u}", "item_id": items[n % len(items)], "event_id": f"r{u}-{n}"}
                        try:
                            log.append((sent, (await c.post("/events", json=body)).status_code))
                        except httpx.HTTPError:
                            log.append((sent, -1))
                        n += 1
                        await asyncio.sleep(0.01)

            tasks = [asyncio.create_task(client(u)) for u in range(8)]
            for _ in range(2):
                await asyncio.sleep(2.0)
                local.kill()
                await asyncio.sleep(0.5)
                await asyncio.to_thread(local.start)
                back.append(time.perf_counter())
            await asyncio.sleep(45.0)  # past the ~40 s after which idle pooled connections used to fail
            stop.set()
            await asyncio.gather(*tasks)
            return log, back

        log, back = asyncio.run(go())
    settled = [(t, code) for t, code in log if t > back[-1] + 0.5]
    out = row(
        "clicks while Redis is killed and restarted x2",
        Counter(code for _, code in log),
        after_restart=len(settled),
        spurious_503_after_restart=sum(code == 503 for _, code in settled),
    )
    print(f"  {out}", flush=True)
    return [out]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "artifacts" / "bundles" / "default")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "chaos")
    parser.add_argument("--only", default="reload,sigterm,storm,heavy-k,slow,shutdown,redis,redis-restart")
    parser.add_argument("--storm-seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    if not (args.bundle / MANIFEST_FILE).is_file():
        sys.exit(f"error: no bundle at {args.bundle} (run ./run demo first, or pass --bundle DIR)")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="karma-chaos-"))
    chosen = set(args.only.split(","))
    rows: list[dict[str, Any]] = []
    try:
        if "reload" in chosen:
            rows += scenario_reload(args.bundle, work)
        if "sigterm" in chosen:
            rows += scenario_sigterm(args.bundle, work)
        if "storm" in chosen:
            rows += scenario_storm(args.bundle, args.storm_seconds)
        if "heavy-k" in chosen:
            rows += scenario_heavy_k(args.bundle, args.storm_seconds)
        if "slow" in chosen:
            rows += scenario_slow(args.bundle)
        if "shutdown" in chosen:
            rows += scenario_upload_shutdown(args.bundle)
        if "redis" in chosen:
            rows += scenario_redis(args.bundle)
        if "redis-restart" in chosen:
            rows += scenario_redis_restart(args.bundle)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = f"{cpu_model()}, {usable_cores()} cores; the load generator runs on this machine too"
    (args.out / "chaos.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1, default=str))
    print(f"\nmachine: {machine}")
    for r in rows:
        rest = {k: v for k, v in r.items() if k not in ("scenario", "requests", "status")}
        print(f"| {r['scenario']} | {r['requests']} | {r['status']} | {rest} |")
    print(f"wrote {args.out / 'chaos.json'}")


if __name__ == "__main__":
    main()
