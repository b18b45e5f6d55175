"""Live items shared by every replica (`serve.index_backend=milvus`): their rows and records in Redis.

Milvus holds the vectors every replica searches; what a replica also needs to *serve* an item added
elsewhere is its id (to name a result row), its features and ID row (to featurise a history that
holds it) and its title. Those live in Redis, beside the histories, per Milvus collection:

    <prefix>items:<collection>:rows   hash  item id -> row (allocated once, never reused)
    <prefix>items:<collection>:next   the next free row (starts at the bundle's item count)
    <prefix>items:<collection>:log    stream of changes: upserts (rows, ids, titles, features, ID rows,
                                      vectors) and deletes, in the order they were indexed

A row is allocated atomically (one Lua script), so two replicas adding the same id get the same row
and two ids never share one. Every replica replays the stream when it loads the bundle (before it is
ready) and then follows it (XREAD BLOCK), applying each change to its catalog only: the index already
has it. A result row a replica has not heard of yet (a change seconds old) is left out, never
misnamed. The registry is as durable as Redis: run it with persistence (AOF) where items are added live.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.engine import Engine, NewItem
from service.history import HistoryStore, RedisUnavailable

if TYPE_CHECKING:
    from service.batching import MicroBatcher

log = logging.getLogger("karma.service")

# KEYS[1] id -> row hash, KEYS[2] next-row counter; ARGV[1] the bundle's item count, ARGV[2..] item ids.
_ALLOCATE = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], tonumber(ARGV[1]) + redis.call('HLEN', KEYS[1]))
end
local rows = {}
for i = 2, #ARGV do
  local row = redis.call('HGET', KEYS[1], ARGV[i])
  if not row then
    row = redis.call('INCR', KEYS[2]) - 1
    redis.call('HSET', KEYS[1], ARGV[i], row)
  end
  rows[#rows + 1] = tonumber(row)
end
return rows
"""

FOLLOW_BLOCK_MS = 1000  # one XREAD waits at most this long for news
FOLLOW_BATCH = 64  # stream entries applied per XREAD
RETRY_S = 1.0  # pause after a failed XREAD (Redis down) before the next


class ItemRegistry:
    """The Redis side of live items for a shared index (see the module docstring)."""

    def __init__(self, store: HistoryStore):
        self.store = store
        self.client = store.client
        # the follower's XREAD BLOCK outlasts the commands' socket timeout: it gets a connection of its own
        self.follower = aioredis.Redis.from_url(
            store.url,
            socket_timeout=FOLLOW_BLOCK_MS / 1000 + store.timeout_s,
            socket_connect_timeout=store.timeout_s,
        )
        self.replica = uuid.uuid4().hex  # names the writer in each record (for people reading the stream)
        self._allocate = self.client.register_script(_ALLOCATE)
        self._task: asyncio.Task[None] | None = None
        self.last_id = "0"
        self._log_key = ""
        self.applied = 0
        self.skipped = 0  # entries that could not be applied (logged)

    def _keys(self, engine: Engine) -> tuple[str, str, str]:
        base = f"{self.store.key_prefix}items:{getattr(engine.index, 'collection', engine.model_version)}"
        return f"{base}:rows", f"{base}:next", f"{base}:log"

    async def upsert(
        self, engine: Engine, batcher: MicroBatcher, items: list[NewItem], inputs: tuple[np.ndarray, Any]
    ) -> list[tuple[int, bool]]:
        """Allocate rows, index the items (encode thread), then record them for the other replicas."""
        rows_key, next_key, log_key = self._keys(engine)
        ids = [item.item_id for item in items]
        fresh = [i for i in ids if engine.row_of.get(i, engine.n_items) >= engine.n_items]  # not a bundle item
        allocated: dict[str, int] = {}
        if fresh:
            got = await self.store._guard(self._allocate(keys=[rows_key, next_key], args=[engine.n_items, *fresh]))
            allocated = {i: int(r) for i, r in zip(fresh, got, strict=True)}
        rows = [allocated[i] if i in allocated else engine.row_of[i] for i in ids]

        def index() -> tuple[list[tuple[int, bool]], dict[str, bytes | str]]:
            result = engine.upsert_items(items, rows, inputs)
            at = np.asarray(rows, dtype=np.int64)
            id_rows = engine.catalog.id_rows[at] if engine.catalog.id_rows is not None else None
            record: dict[str, bytes | str] = {
                "op": "upsert",
                "replica": self.replica,
                "rows": json.dumps(rows),
                "ids": json.dumps(ids),
                "titles": json.dumps([item.title for item in items]),
                "features": np.ascontiguousarray(engine.catalog.features[at], dtype=np.float32).tobytes(),
                "id_rows": b"" if id_rows is None else np.ascontiguousarray(id_rows, dtype=np.int64).tobytes(),
                "vectors": np.ascontiguousarray(engine.catalog.embeddings[at], dtype=np.float32).tobytes(),
            }
            return result, record

        result, record = await batcher.run_in_worker(index)
        await self.store._guard(self.client.xadd(log_key, record))
        return result

    async def delete(self, engine: Engine, batcher: MicroBatcher, item_id: str) -> int | None:
        rows_key, _, log_key = self._keys(engine)
        row = engine.row_of.get(item_id)
        if row is None:  # added by another replica a moment ago?
            held = await self.store._guard(self.client.hget(rows_key, item_id))
            if held is None:
                return None
            await self.catch_up(engine, batcher)
        deleted = await batcher.run_in_worker(lambda: engine.delete_item(item_id))
        if deleted is not None:
            record = {"op": "delete", "replica": self.replica, "rows": json.dumps([deleted])}
            await self.store._guard(self.client.xadd(log_key, record))
        return deleted

    # ---- following the other replicas -----------------------------------------------------------

    def _apply(self, engine: Engine, fields: dict[bytes, bytes]) -> None:
        """One stream entry into this replica's catalog (encode thread)."""
        get = {k.decode(): v for k, v in fields.items()}
        rows = json.loads(get["rows"])
        if get["op"] == b"delete":
            for row in rows:
                engine.catalog.delete(int(row))
            return
        ids, titles = json.loads(get["ids"]), json.loads(get["titles"])
        features = np.frombuffer(get["features"], dtype=np.float32).reshape(len(rows), -1)
        vectors = np.frombuffer(get["vectors"], dtype=np.float32).reshape(len(rows), -1)
        id_rows = np.frombuffer(get["id_rows"], dtype=np.int64) if get["id_rows"] else None
        items = [NewItem(i, {}, t) for i, t in zip(ids, titles, strict=True)]
        engine.apply_items(rows, items, features, id_rows, vectors)

    async def _read(self, engine: Engine, block_ms: int | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        _, _, log_key = self._keys(engine)
        if log_key != self._log_key:  # another model (a reload): its own collection, its own log from the start
            self._log_key, self.last_id = log_key, "0"
        client = self.client if block_ms is None else self.follower
        answer = await client.xread({log_key: self.last_id}, count=FOLLOW_BATCH, block=block_ms)
        return answer[0][1] if answer else []

    async def _apply_batch(self, engine: Engine, batcher: MicroBatcher, entries: list[Any]) -> None:
        """Apply stream entries in order (encode thread). Every entry is applied, this replica's own too: a record
        is idempotent, and a reload must see what the replica wrote before it. An entry that cannot be applied is
        logged and skipped, so one bad record never stops a replica from following the rest."""

        def apply() -> None:
            for entry_id, fields in entries:
                try:
                    self._apply(engine, fields)
                    self.applied += 1
                except Exception as exc:
                    self.skipped += 1
                    log.error("live item registry: entry %s not applied (%s: %s)", entry_id, type(exc).__name__, exc)

        await batcher.run_in_worker(apply)
        self.last_id = entries[-1][0].decode()

    def restart(self) -> None:
        """Read the log from its start again (a new engine: its catalog holds none of it yet)."""
        self.stop()
        self.last_id, self._log_key = "0", ""

    async def catch_up(self, engine: Engine, batcher: MicroBatcher) -> int:
        """Apply every change recorded so far; the number of entries read."""
        read = 0
        try:
            while entries := await self._read(engine, None):
                await self._apply_batch(engine, batcher, entries)
                read += len(entries)
        except (RedisError, OSError) as exc:
            raise RedisUnavailable(f"live item registry: {exc}") from None
        return read

    def follow(self, engine: Engine, batcher: MicroBatcher) -> None:
        """Start following the stream for `engine` (replacing any earlier follower)."""
        self.stop()
        self._task = asyncio.create_task(self._follow(engine, batcher), name="karma-item-registry")

    async def _follow(self, engine: Engine, batcher: MicroBatcher) -> None:
        while True:
            try:
                entries = await self._read(engine, FOLLOW_BLOCK_MS)
                if entries:
                    await self._apply_batch(engine, batcher, entries)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down, a batcher stopping: retry, never die silently
                log.warning("live item registry: %s: %s; retrying in %.0f s", type(exc).__name__, exc, RETRY_S)
                await asyncio.sleep(RETRY_S)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.follower.aclose()
