"""Per-user click histories in Redis: one list per user, oldest first, bounded to the model's max_history.

Key: `<serve.redis_key_prefix>hist:<user_id>`; entries are `"<unix seconds>|<item_id>"` (the item
id may itself contain `|`: only the first one splits). An append is one MULTI/EXEC transaction
(RPUSH + LTRIM), so concurrent events for one user never leave the list over its bound.

Every Redis failure (refused, timeout, protocol) becomes `RedisUnavailable` and is counted; the
client reconnects by itself on the next command, so the service recovers when Redis returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

log = logging.getLogger("karma.service")


class RedisUnavailable(Exception):
    """Redis could not serve a command; the message says why (for /readyz and 503 bodies)."""


@dataclass(frozen=True)
class Event:
    item_id: str
    timestamp: float


def _encode(item_id: str, timestamp: float) -> str:
    return f"{timestamp:.3f}|{item_id}"


def _item_of(entry: bytes) -> str:
    """The item id of one entry (the fast path of `_decode` for /search, which needs no timestamps)."""
    text = entry.decode("utf-8", "replace")
    ts, sep, item = text.partition("|")
    if not sep:
        return text
    try:
        float(ts)
    except ValueError:
        return text
    return item


def _decode(entry: bytes | str) -> Event:
    text = entry.decode("utf-8", "replace") if isinstance(entry, bytes) else entry
    ts, sep, item = text.partition("|")
    if not sep:  # a bare item id (written by something else): no timestamp
        return Event(item_id=text, timestamp=0.0)
    try:
        return Event(item_id=item, timestamp=float(ts))
    except ValueError:
        return Event(item_id=text, timestamp=0.0)


def _reason(exc: BaseException) -> str:
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {detail}"


class HistoryStore:
    def __init__(self, url: str, key_prefix: str, timeout_s: float, on_error: object | None = None):
        self.url = url
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self._on_error = on_error  # a prometheus Counter (inc) or None
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),  # one immediate retry: survives a stale pooled connection
            health_check_interval=0,
        )
        self.last_error: str | None = None

    def key(self, user_id: str) -> str:
        return f"{self.key_prefix}hist:{user_id}"

    def _failed(self, exc: BaseException) -> RedisUnavailable:
        self.last_error = _reason(exc)
        if self._on_error is not None:
            self._on_error.inc()  # type: ignore[attr-defined]
        log.warning("redis error: %s", self.last_error)
        return RedisUnavailable(self.last_error)

    async def _guard(self, coro):  # type: ignore[no-untyped-def]
        try:
            async with asyncio.timeout(self.timeout_s * 3):  # connect + command + one retry, at most
                result = await coro
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._failed(exc) from None
        self.last_error = None
        return result

    async def append(self, user_id: str, item_id: str, timestamp: float, max_history: int) -> int:
        """Append one click and trim to the newest `max_history`; returns the stored length."""
        key = self.key(user_id)

        async def run() -> int:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.rpush(key, _encode(item_id, timestamp))
                pipe.ltrim(key, -max_history, -1)
                pushed, _ = await pipe.execute()
            return min(int(pushed), max_history)

        return await self._guard(run())

    async def read(self, user_id: str, max_history: int) -> list[Event]:
        entries = await self._guard(self.client.lrange(self.key(user_id), -max_history, -1))
        return [_decode(e) for e in entries]

    async def read_item_ids(self, user_id: str, max_history: int) -> list[str]:
        """The newest `max_history` item ids, oldest first (what /search needs)."""
        entries = await self._guard(self.client.lrange(self.key(user_id), -max_history, -1))
        return [_item_of(e) for e in entries]

    async def clear(self, user_id: str) -> bool:
        return bool(await self._guard(self.client.delete(self.key(user_id))))

    async def ping(self) -> None:
        await self._guard(self.client.ping())

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):  # closing a client whose server is gone
            await self.client.aclose()

    def describe(self) -> str:
        """The URL without a password (for /info and logs)."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(self.url)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
            return urlunsplit(parts._replace(netloc=netloc))
        return self.url
