"""Bounds on loading a bundle: a watchdog that stops ONNX Runtime past a memory or time budget.

A bundle is data a client (an operator's reload) hands the service, so loading it must not be able
to eat the machine: a manifest saying `max_history: 4096` once grew the server past 18.8 GB in the
warm-up batch, held the reload lock and ignored SIGTERM. Three things bound a load now:

- the token budget (`serve.max_batch_tokens`) caps batch x length before anything runs, so the
  warm-up batch of a long-history bundle is small (`Engine.prepare`);
- `LoadGuard`, a watchdog thread polling this process's RSS and the clock; past
  `serve.load_memory_budget_mb` of growth or `serve.load_timeout_s` it sets `terminate` on the
  `RunOptions` every probe/warm-up run uses, so ONNX Runtime stops between graph nodes and the run
  raises; the bundle is refused and the one serving keeps serving;
- the load runs in a daemon thread (`run_in_daemon_thread`), and shutdown stops the guard, so a
  load in progress never keeps the process alive past the drain timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from karma.errors import KarmaError

T = TypeVar("T")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class LoadStopped(KarmaError):
    """A bundle load was stopped: over its memory or time budget, or the service is shutting down."""


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 where it cannot be read: no memory bound)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class LoadGuard:
    """Watch one bundle load; `stop(reason)` (from the watchdog or shutdown) terminates its ORT runs.

    Use as a context manager around the load; pass `run_options` to every session run of the load
    and call `check()` between stages (a stop between runs is noticed there).
    """

    def __init__(self, memory_budget_mb: int, timeout_s: float, poll_s: float = 0.01):
        import onnxruntime as ort

        self.memory_budget = memory_budget_mb * 1024 * 1024
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.run_options: Any = ort.RunOptions()
        self.reason: str | None = None
        self.baseline_rss = 0
        self.peak_rss = 0
        self._began = 0.0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LoadGuard:
        self.baseline_rss = self.peak_rss = rss_bytes()
        self._began = time.perf_counter()
        self._thread = threading.Thread(target=self._watch, name="karma-load-guard", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    @property
    def peak_growth_mb(self) -> float:
        return max(0, self.peak_rss - self.baseline_rss) / 2**20

    def _watch(self) -> None:
        while not self._done.wait(self.poll_s):
            rss = rss_bytes()
            self.peak_rss = max(self.peak_rss, rss)
            grown = rss - self.baseline_rss
            if self.baseline_rss and grown > self.memory_budget:
                self.stop(
                    f"loading grew the server's memory by {grown / 2**20:.0f} MiB, over serve.load_memory_budget_mb="
                    f"{self.memory_budget // 2**20}"
                )
            elif time.perf_counter() - self._began > self.timeout_s:
                self.stop(f"loading took over serve.load_timeout_s={self.timeout_s:g} s")
            if self.reason is not None:
                return

    def stop(self, reason: str) -> None:
        """Stop the load (idempotent: the first reason wins)."""
        if self.reason is None:
            self.reason = reason
        self.run_options.terminate = True

    def check(self) -> None:
        """Raise LoadStopped if the load was stopped (call between stages)."""
        if self.reason is not None:
            raise LoadStopped(f"stopped: {self.reason}")


async def run_in_daemon_thread(fn: Callable[[], T], name: str) -> T:
    """Await `fn()` run in a daemon thread: unlike asyncio.to_thread, it never blocks interpreter exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # the awaiting request was cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # handed to the awaiting coroutine, raised there
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future
