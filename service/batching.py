"""Micro-batching: concurrent /search requests are encoded and searched together in one worker thread.

Requests enter a bounded asyncio queue (full -> `QueueFull`, which the route answers with 429). One
asyncio task takes the first waiting job, lets same-tick arrivals join, and — when more than one
is already waiting — keeps the batch open up to `max_wait` for more, never beyond `max_batch`. The
batch then runs in a single-thread executor (ONNX Runtime and FAISS release the GIL), so the event
loop never blocks and the encoder never runs two batches at once. While a batch runs, new requests
queue up and form the next one: at low load a lone request is dispatched at once (no added wait);
under load batches grow by themselves (continuous batching, as in TEI/vLLM routers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from service.engine import Engine, Job, JobResult

log = logging.getLogger("karma.service")


class QueueFull(Exception):
    """The bounded queue has no room; the caller should answer 429."""


class BatcherStopped(Exception):
    """The batcher is draining or stopped; the caller should answer 503."""


class MicroBatcher:
    def __init__(
        self,
        engine: Engine,
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        on_batch: Callable[[int], Any] | None = None,
    ):
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue: asyncio.Queue[tuple[Job, asyncio.Future[JobResult]] | None] = asyncio.Queue(maxsize=queue_size)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="karma-encode")
        self._on_batch = on_batch
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._busy = False

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def start(self) -> None:
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._run(), name="karma-batcher")

    async def submit(self, job: Job) -> JobResult:
        if not self._accepting:
            raise BatcherStopped("the service is shutting down")
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        job.enqueued = time.perf_counter()
        try:
            self.queue.put_nowait((job, future))
        except asyncio.QueueFull:
            raise QueueFull(f"encoder queue full ({self.queue.maxsize} waiting)") from None
        return await future

    async def run_in_worker(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the encoder thread (serialised with the batches), e.g. the readiness probe."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def _collect(self) -> list[tuple[Job, asyncio.Future[JobResult]]] | None:
        first = await self.queue.get()
        if first is None:
            return None
        batch = [first]
        await asyncio.sleep(0)  # let requests that arrived in the same tick enqueue
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                entry = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if len(batch) == 1 or remaining <= 0:
                    break  # a lone request never waits; a forming batch waits at most max_wait
                try:
                    entry = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
            if entry is None:  # stop signal: finish this batch first, then stop
                self.queue.put_nowait(None)
                break
            batch.append(entry)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if batch is None:
                return
            live = [(job, fut) for job, fut in batch if not fut.done()]  # skip requests whose client left
            if not live:
                continue
            self._busy = True
            try:
                results = await loop.run_in_executor(self.executor, self.engine.run_batch, [j for j, _ in live])
            except Exception as exc:  # a bug or a broken model: fail these requests, keep serving others
                log.exception("batch of %d failed", len(live))
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            finally:
                self._busy = False
            if self._on_batch is not None:
                self._on_batch(len(live))
            for (_, fut), result in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def stop(self, timeout_s: float) -> None:
        """Refuse new jobs, finish the queued ones (up to `timeout_s`), then stop the worker and thread."""
        self._accepting = False
        if self._task is not None and not self._task.done():
            # Room is guaranteed eventually: the worker keeps draining; wait for it rather than drop.
            try:
                async with asyncio.timeout(timeout_s):
                    await self.queue.put(None)
                    await asyncio.shield(self._task)
            except TimeoutError:
                log.warning("batcher did not drain within %.1f s; cancelling %d queued jobs", timeout_s, self.depth)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                while not self.queue.empty():
                    entry = self.queue.get_nowait()
                    if entry is not None and not entry[1].done():
                        entry[1].set_exception(BatcherStopped("the service stopped before this request ran"))
        self.executor.shutdown(wait=True, cancel_futures=True)
