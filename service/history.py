"""Per-user click histories in Redis: one list per user, oldest first, bounded by `serve.history_max_events`.

Key: `<serve.redis_key_prefix>hist:<user_id>`; entries are `"<unix seconds>|<item_id>"` (the item
id may itself contain `|`: only the first one splits). The stored bound is a service setting, not
the model's input length: a reload to a bundle with a shorter `max_history` never trims what is
stored (the model reads the newest N it needs), so rolling back restores the longer view.

An append is one Lua script (atomic on the server): `SET NX` of the event's id under
`<prefix>evt:<len(user_id)>:<user_id>:<event_id>` (expiring after `serve.event_id_ttl_s`), and only if that id is
new, RPUSH + LTRIM. A client that retries a click whose answer it did not get (a timeout, a 503 from
a frozen Redis) sends the same `event_id` and the click is stored once; events without a client id
get a fresh one, so the client library's own retry after a lost reply cannot double them either.

Every Redis failure (refused, timeout, protocol) becomes `RedisUnavailable` and is counted. Pooled
connections that Redis closed (a restart) are retried once on a fresh connection (the asyncio
`Retry`; the synchronous one, passed to the asyncio client, silently never retried) and pinged
before reuse after `serve.redis_health_check_s` idle, so a Redis restart costs no request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("karma.service")


class RedisUnavailable(Exception):
    """Redis could not serve a command; the message says why (for /readyz and 503 bodies)."""


@dataclass(frozen=True)
class Event:
    item_id: str
    timestamp: float


# KEYS[1] history list, KEYS[2] event-id marker; ARGV: entry, max events, id TTL seconds.
# Returns {stored length, 1 if the event id was seen before (nothing appended) else 0}.
_APPEND_ONCE = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[3])) then
  return {redis.call('LLEN', KEYS[1]), 1}
end
local n = redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
return {math.min(n, tonumber(ARGV[2])), 0}
"""


@dataclass(frozen=True)
class Appended:
    length: int  # the user's stored history length after this event
    duplicate: bool  # the event id was already recorded: nothing was appended
    event_id: str


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
    def __init__(
        self,
        url: str,
        key_prefix: str,
        timeout_s: float,
        on_error: object | None = None,
        health_check_s: float = 5.0,
        event_id_ttl_s: int = 86_400,
    ):
        self.url = url
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.event_id_ttl_s = event_id_ttl_s
        self._on_error = on_error  # a prometheus Counter (inc) or None
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # One immediate retry on a new connection: a pooled connection that Redis closed fails once.
            retry=Retry(NoBackoff(), 1, (RedisConnectionError, RedisTimeoutError)),
            health_check_interval=health_check_s,
        )
        self._append_once = self.client.register_script(_APPEND_ONCE)
        self.last_error: str | None = None

    def key(self, user_id: str) -> str:
        return f"{self.key_prefix}hist:{user_id}"

    def event_key(self, user_id: str, event_id: str) -> str:
        # The user id's length keeps ("u:1", "x") and ("u", "1:x") apart: ids may contain ':'.
        return f"{self.key_prefix}evt:{len(user_id)}:{user_id}:{event_id}"

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

    async def append(
        self, user_id: str, item_id: str, timestamp: float, max_events: int, event_id: str | None = None
    ) -> Appended:
        """Append one click (once per `event_id`) and trim to the newest `max_events`."""
        event_id = event_id or uuid.uuid4().hex
        keys = [self.key(user_id), self.event_key(user_id, event_id)]
        args = [_encode(item_id, timestamp), max_events, self.event_id_ttl_s]
        length, seen = await self._guard(self._append_once(keys=keys, args=args))
        return Appended(int(length), bool(seen), event_id)

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
        """The URL with every credential masked (user:password@, ?password=...), for /info and logs."""
        return mask_url(self.url)


_SECRET_PARAMS = {"password", "pass", "pwd", "token", "secret", "auth", "key"}


def mask_url(url: str) -> str:
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = parts.query
    if query:
        pairs = [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        query = urlencode(pairs, safe="*")
    # Built by hand: urlunsplit drops the empty authority of unix:///path URLs.
    text = f"{parts.scheme}://{netloc}{parts.path}" if "://" in url else urlunsplit(parts._replace(query=""))
    return text + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
