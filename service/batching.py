"""Micro-batching: concurrent /search requests are encoded and searched together in one worker thread.

Requests enter a bounded asyncio queue (full -> `QueueFull`, which the route answers with 429). One
asyncio task takes the first waiting job with everything already queued and — when more than one
is waiting — keeps the batch open up to `max_wait` for more, never beyond `max_batch`. The
batch then runs in a single-thread executor (ONNX Runtime and FAISS release the GIL), so the event
loop never blocks and the encoder never runs two batches at once. While a batch runs, new requests
queue up and form the next one: at low load a lone request is dispatched at once (no added wait);
under load batches grow by themselves (continuous batching, as in TEI/vLLM routers).

Each job is queued (`enqueue_many`) with the engine it must run on (the one the request resolved its item ids
with). A hot reload swaps which engine new requests get; jobs already queued still run on the old
one, so a batch that straddles a swap is split into one run per engine.
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


Entry = tuple[Engine, Job, asyncio.Future[JobResult]]


class MicroBatcher:
    def __init__(
        self,
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        on_batch: Callable[[int], Any] | None = None,
        max_batch_tokens: int | None = None,
    ):
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens  # batch size x longest request (Engine.request_tokens)
        self._carry: Entry | None = None  # taken from the queue but over the last batch's token budget
        self.max_wait_s = max_wait_s
        self.queue: asyncio.Queue[Entry | None] = asyncio.Queue(maxsize=queue_size)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="karma-encode")
        self._on_batch = on_batch
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._busy = False

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    @property
    def room(self) -> int:
        """How many more jobs the queue takes now (a many-input request is refused whole if they do not fit)."""
        return self.queue.maxsize - self.queue.qsize()

    def start(self) -> None:
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._run(), name="karma-batcher")

    def enqueue_many(self, engine: Engine, jobs: list[Job]) -> list[asyncio.Future[JobResult]]:
        """Queue all of `jobs` or none (QueueFull when the queue has no room for every one), in one step of the
        event loop: a many-input request is never half-queued. Await the returned futures."""
        if not self._accepting:
            raise BatcherStopped("the service is shutting down")
        if self.room < len(jobs):
            raise QueueFull(f"encoder queue has room for {self.room} of this request's {len(jobs)} inputs")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futures: list[asyncio.Future[JobResult]] = []
        for job in jobs:
            future: asyncio.Future[JobResult] = loop.create_future()
            job.enqueued = now
            self.queue.put_nowait((engine, job, future))
            futures.append(future)
        return futures

    async def run_in_worker(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the encoder thread (serialised with the batches), e.g. the readiness probe."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    def _fits(self, batch: list[Entry], longest: int, entry: Entry) -> tuple[bool, int]:
        """(whether `entry` joins `batch` within the token budget, the batch's longest request then)."""
        if self.max_batch_tokens is None:
            return True, longest
        engine, job, _ = entry
        longer = max(longest, engine.request_tokens(job))
        return (len(batch) + 1) * longer <= self.max_batch_tokens, longer  # padding: all as long as the longest

    async def _collect(self) -> list[Entry] | None:
        if self._carry is not None:
            first, self._carry = self._carry, None
        else:
            first = await self.queue.get()
        if first is None:
            return None
        batch = [first]
        _, longest = self._fits([], 0, first)  # a lone request always runs (the bundle was checked to fit)
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
            fits, longer = self._fits(batch, longest, entry)
            if not fits:  # over the token budget: it opens the next batch
                self._carry = entry
                break
            batch.append(entry)
            longest = longer
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if batch is None:
                return
            groups: dict[int, list[Entry]] = {}  # one run per engine (two only around a hot reload)
            for entry in batch:
                if not entry[2].done():  # skip requests whose client left
                    groups.setdefault(id(entry[0]), []).append(entry)
            for group in groups.values():
                await self._run_group(group)

    async def _run_group(self, group: list[Entry]) -> None:
        """Run one engine's batch on the encoder thread; the thread hands results straight to the requests."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()
        self._busy = True
        try:
            try:
                self.executor.submit(self._work, loop, group, finished)
            except RuntimeError as exc:  # the executor is shut down: fail these, never hang them
                self._deliver(group, BatcherStopped(f"the encoder thread is gone ({exc})"), finished)
            await finished
        finally:
            self._busy = False

    def _work(self, loop: asyncio.AbstractEventLoop, group: list[Entry], finished: asyncio.Future[None]) -> None:
        """Encoder thread: run the batch, then deliver everything in one event-loop callback.

        (One callback instead of run_in_executor's chained futures saves an event-loop round trip
        between the batch finishing and the requests resuming.)
        """
        engine = group[0][0]
        try:
            outcome: list[JobResult] | BaseException = engine.run_batch([job for _, job, _ in group])
        except Exception as exc:  # a bug or a broken model: fail these requests, keep serving others
            log.exception("batch of %d failed", len(group))
            outcome = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(self._deliver, group, outcome, finished)

    def _deliver(
        self, group: list[Entry], outcome: list[JobResult] | BaseException, finished: asyncio.Future[None]
    ) -> None:
        if isinstance(outcome, BaseException):
            for _, _, fut in group:
                if not fut.done():
                    fut.set_exception(outcome)
        else:
            if self._on_batch is not None:
                self._on_batch(len(group))
            for (_, _, fut), result in zip(group, outcome, strict=True):
                if not fut.done():
                    fut.set_result(result)
        if not finished.done():
            finished.set_result(None)

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
                if self._carry is not None and not self._carry[2].done():
                    self._carry[2].set_exception(BatcherStopped("the service stopped before this request ran"))
                self._carry = None
                while not self.queue.empty():
                    entry = self.queue.get_nowait()
                    if entry is not None and not entry[2].done():
                        entry[2].set_exception(BatcherStopped("the service stopped before this request ran"))
        self.executor.shutdown(wait=True, cancel_futures=True)
