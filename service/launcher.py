"""Run `karma serve` as its own process and wait until it is ready (torch-free).

Used by `karma demo` and the service benchmarks, so "start the real server on a free loopback
port, wait for /readyz, stop it with SIGTERM (graceful drain), remove its Redis keys" exists once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from karma.errors import KarmaError
from karma.machine import THREAD_ENV


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def delete_prefix(redis_url: str, prefix: str) -> None:
    """Delete every Redis key under `prefix` (best effort: Redis may be gone)."""
    import redis

    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])


def wait_ready(proc: subprocess.Popen, base: str, timeout_s: float, exit_detail: Callable[[], str]) -> None:
    """Poll `base`/readyz until 200; raise if the process exits (with `exit_detail()`) or time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise KarmaError(f"karma serve exited with {proc.returncode}: {exit_detail()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise KarmaError(f"karma serve did not become ready on {base} within {timeout_s:.0f} s")
        time.sleep(0.2)


@contextlib.contextmanager
def karma_serve(
    bundle: Path,
    redis_url: str,
    sets: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout_s: float = 120,
    cwd: Path | None = None,
    entry: Sequence[str] | None = None,
) -> Iterator[tuple[str, str]]:
    """Run `karma serve` on a free port with its own Redis key prefix; yields (base URL, prefix).

    `entry` replaces the command before `--bundle` (default `python -m recipes.cli serve`) with another
    server that takes the same `--bundle/--port/--set` options (e.g. `python -m bench.naive ...`).
    """
    port = free_port()
    prefix = f"karma-run-{uuid.uuid4().hex[:12]}-"
    command = [
        *(entry or (sys.executable, "-m", "recipes.cli", "serve")),
        *("--bundle", str(bundle), "--port", str(port)),
        *("--set", f"serve.redis_url={redis_url}", "--set", f"serve.redis_key_prefix={prefix}"),
        *[arg for s in sets for arg in ("--set", s)],
    ]
    with tempfile.TemporaryFile("w+") as log:  # the server's JSON log; shown if it fails to start
        proc = subprocess.Popen(
            command, cwd=cwd, env={**os.environ, **THREAD_ENV, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(proc, base, timeout_s, lambda: (log.seek(0), log.read())[1])
            yield base, prefix
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            delete_prefix(redis_url, prefix)


def long_history_copy(bundle: Path, max_history: int, root: Path) -> Path:
    """A copy of `bundle` under `root` whose re-signed manifest says `max_history` (for load-budget drills).

    Every integrity check passes, so only the value is hostile: the service must refuse it on its merits.
    """
    import json
    import shutil

    from karma.bundle import MANIFEST_FILE, resign_bundle

    out = root / f"max-history-{max_history}"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["max_history"] = max_history
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    resign_bundle(out)
    return out


class LocalRedis:
    """A throwaway `redis-server` on a free loopback port (no persistence), for fault drills.

    Fault tests kill (`kill`), restart (`start` again, same port) and freeze
    (`freeze`/`thaw`: SIGSTOP/SIGCONT) this one, never the shared Redis at 6379.
    """

    def __init__(self, port: int | None = None):
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            raise KarmaError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        import redis

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis.from_url(self.url, socket_timeout=0.5).ping():
                    return self
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise KarmaError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL (what a crash or an OOM kill does): every client connection breaks."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
