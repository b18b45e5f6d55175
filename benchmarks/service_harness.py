"""Shared by the service benchmarks: build a tiny bundle with the CLI, run `karma serve`, clean Redis.

Everything runs through the real command-line tools (`karma train`, `karma export`, `karma serve`)
in subprocesses, single-threaded (1 torch / ORT / BLAS thread), with outputs under a work folder.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx

KARMA = str(Path(sys.executable).with_name("karma"))
REPO = Path(__file__).resolve().parents[1]
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# A seconds-scale model: tiny backbone, hashing text features, short training.
TINY = [
    "data.max_history=20",
    "features.text_encoder=hashing",
    "features.threads=1",
    "model.tiny_hidden=32",
    "model.embed_dim=32",
    "model.item_tower_hidden=64",
    "loss.sampled_negatives=32",
    "loss.flow_hidden=64",
    "train.threads=1",
    "train.batch_size=16",
    "train.steps=6",
    "train.semantic_warmup_steps=2",
    "train.warmup_steps=2",
    "train.checkpoint_every=1000000",
    "eval.max_users=100",
]
SMALL_DATA = ["data.synthetic.n_items=1000", "data.synthetic.n_users=300", "data.synthetic.n_events=6000"]


def _run(command: list[str], what: str) -> None:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env={**os.environ, **THREAD_ENV}, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"  {what}: {time.perf_counter() - started:.1f} s", file=sys.stderr)


def build_bundle(workdir: Path, overrides: list[str]) -> Path:
    """`karma train` + `karma export` into `workdir` (artifacts/ and bundle/); returns the bundle folder."""
    artifacts = workdir / "artifacts"
    sets = [f"paths.artifacts={artifacts}", "train.run_name=bench", *overrides]
    _run([KARMA, "train", *[arg for s in sets for arg in ("--set", s)]], "karma train")
    bundle = workdir / "bundle"
    _run([KARMA, "export", str(artifacts / "runs" / "bench" / "checkpoint"), "--out", str(bundle)], "karma export")
    return bundle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def karma_serve(
    bundle: Path, redis_url: str, sets: list[str] = (), env: dict[str, str] | None = None, timeout_s: float = 120
) -> Iterator[tuple[str, str]]:
    """Run `karma serve` on a free port with its own Redis key prefix; yields (base URL, prefix).

    On exit: SIGTERM (graceful drain), then the prefix's Redis keys are deleted.
    """
    port = free_port()
    prefix = f"karma-bench-{uuid.uuid4().hex[:12]}-"
    command = [
        KARMA, "serve", "--bundle", str(bundle), "--port", str(port),
        "--set", f"serve.redis_url={redis_url}", "--set", f"serve.redis_key_prefix={prefix}",
        *[arg for s in sets for arg in ("--set", s)],
    ]  # fmt: skip
    with tempfile.TemporaryFile("w+") as log:  # the server's JSON log; shown if it fails to start
        proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, **THREAD_ENV, **(env or {})}, stderr=log)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(proc, base, log, timeout_s)
            yield base, prefix
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            delete_prefix(redis_url, prefix)


def _wait_ready(proc: subprocess.Popen, base: str, log: IO[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"karma serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        if time.monotonic() > deadline:
            sys.exit(f"karma serve did not become ready in {timeout_s} s")
        time.sleep(0.2)


def delete_prefix(redis_url: str, prefix: str) -> None:
    import redis

    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
