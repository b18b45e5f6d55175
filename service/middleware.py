"""One pure-ASGI middleware for what every request needs (cheaper than Starlette's BaseHTTPMiddleware).

- a request id (the client's `X-Request-Id` if sane, else a new one), echoed in the response;
- the optional API key of the public routes (`serve.api_key`; 401 before anything else is read);
- admission control (`Admission`): at most `serve.max_concurrent_requests` at work; more wait for a
  slot (bounded room, bounded time) before their body is parsed, then get 429 `overloaded`
  (pre-encoded bytes); health, readiness and metrics are never held or refused;
- the body-size limit: bodies over `max_body_bytes` get 413 before any parsing (Content-Length is
  checked first; chunked bodies are counted while read); a body not received within
  `body_timeout_s` gets 408, so stalled uploads do not pile up as requests in flight;
- a request cancelled by the server's shutdown before it answered gets a typed 503 (uvicorn would
  log a traceback and send a bare 500);
- the fast path for valid `POST /search` requests (service.fastpath), which needs the buffered body;
- in-flight accounting, so shutdown can drain;
- `karma_request_duration_seconds{endpoint,method,status}` and one JSON access-log line;
- the last line of defence: an exception that escaped every handler is a bug, logged with its
  traceback and answered with a typed 500 (never a bare one).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ErrorType, error_response
from service.logs import request_id_var
from service.metrics import InFlight, Metrics, endpoint_label

if TYPE_CHECKING:
    from service.fastpath import FastSearch

log = logging.getLogger("karma.service")
access_log = logging.getLogger("karma.service.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_BODY_METHODS = {"POST", "PUT", "PATCH"}


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


# Never refused by admission control: probes and scrapes must see an overloaded replica as it is.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Open even with serve.api_key set: probes, scrapes, the docs; /admin/* checks its own key.
OPEN_PREFIXES = ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/admin/")


def _api_key_of(headers: dict[str, str]) -> bytes:
    """The key a request presents: `Authorization: Bearer <key>` or `X-API-Key: <key>` (b"" if none)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip().encode("latin-1")
    return headers.get("x-api-key", "").strip().encode("latin-1")


def _overloaded_response(retry_after_s: int) -> tuple[Message, Message]:
    """The 429 `overloaded` answer as two ready ASGI messages (built once, sent as is)."""
    body = error_response(
        429,
        "too many requests in flight on this replica; retry after the Retry-After delay, with backoff",
        ErrorType.OVERLOADED,
    ).body
    start: Message = {
        "type": "http.response.start",
        "status": 429,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry_after_s).encode()),
        ],
    }
    return start, {"type": "http.response.body", "body": body}


class Admission:
    """At most `limit` requests at work; up to `max_waiting` more wait (FIFO, at most `max_wait_s`) for a slot.

    A request enters once its body has arrived (a stalled upload holds no slot). Waiting costs a
    parked future, no CPU, so clients that resend every refusal at once are slowed to the pace the
    encoder sets instead of burning the CPU on refusals: a retry storm then sees its requests
    served late rather than refused (Little's law: latency = clients / throughput), and goodput stays
    at the knee. Past the wait or the waiting room, `enter` answers False: the caller sends 429.
    """

    def __init__(self, limit: int, max_waiting: int, max_wait_s: float):
        self.limit = limit
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self.working = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def enter(self) -> bool:
        if self.working < self.limit and not self._waiting:
            self.working += 1
            return True
        if len(self._waiting) >= self.max_waiting or self.max_wait_s <= 0:
            return False
        loop = asyncio.get_running_loop()
        slot: asyncio.Future[None] = loop.create_future()
        self._waiting.append(slot)
        timer = loop.call_later(self.max_wait_s, _expire, slot)
        try:
            await slot  # `leave` hands over its slot (working stays counted) or the timer expires it
            return True
        except TimeoutError:
            self._discard(slot)
            return False
        except asyncio.CancelledError:  # the request was cancelled while it waited
            if slot.done() and not slot.cancelled() and slot.exception() is None:
                self.leave()  # a slot was handed over just before: pass it on
            else:
                self._discard(slot)
            raise
        finally:
            timer.cancel()

    def _discard(self, slot: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiting.remove(slot)

    def leave(self) -> None:
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot passes straight to the longest waiter
                return
        self.working -= 1


def _expire(slot: asyncio.Future[None]) -> None:
    if not slot.done():
        slot.set_exception(TimeoutError())


class ServiceMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        in_flight: InFlight,
        max_body_bytes: int,
        access: bool,
        fast: FastSearch | None = None,
        admission: Admission | None = None,
        body_timeout_s: float | None = None,
        retry_after_s: int = 1,
        api_key: str | None = None,
    ):
        self.app = app
        self.api_key = None if api_key is None else api_key.encode("latin-1")
        self.admission = admission
        self.body_timeout_s = body_timeout_s
        self._overloaded = _overloaded_response(retry_after_s)
        self.fast = fast
        self.metrics = metrics
        self.in_flight = in_flight
        self.max_body_bytes = max_body_bytes
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["t0"] = started
        state["request_id"] = request_id
        token = request_id_var.set(request_id)
        response: dict[str, Any] = {"status": 500, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                response["started"] = True
                # a new message: the one passed in may be shared (the pre-built 429)
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            await send(message)

        self.in_flight.count += 1
        self.metrics.in_flight.inc()
        working = False
        try:
            if (
                self.api_key is not None
                and not scope["path"].startswith(OPEN_PREFIXES)
                and not hmac.compare_digest(_api_key_of(headers), self.api_key)
            ):
                self.metrics.rejected.labels(reason="unauthorized").inc()
                refuse = error_response(
                    401, "this route needs the API key: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                    "unauthorized", None, {"WWW-Authenticate": 'Bearer realm="karma"'},
                )  # fmt: skip
                await refuse(scope, receive, send_with_id)
                return
            app_receive = receive
            body: bytes | None = None
            if scope["method"] in _BODY_METHODS:
                refused = self._check_length(headers.get("content-length"))
                if refused is None:
                    try:
                        body = await self._read_body(receive)
                    except _BodyTooLarge:
                        refused = f"request body is over the {self.max_body_bytes}-byte limit"
                    except _BodyTimeout:
                        self.metrics.rejected.labels(reason="body_timeout").inc()
                        message = (
                            f"the request body did not arrive within {self.body_timeout_s:g} s (serve.body_timeout_s)"
                        )
                        timeout = error_response(408, message, "body_timeout", "body", {"Connection": "close"})
                        await timeout(scope, receive, send_with_id)
                        return
                if refused is not None:
                    self.metrics.rejected.labels(reason="payload_too_large").inc()
                    await error_response(413, refused, "payload_too_large", "body")(scope, receive, send_with_id)
                    return
                app_receive = _replay(body, receive)
                state["body"] = body  # for error messages about an unparseable body (service.errors)
            client_left = scope["method"] in _BODY_METHODS and body is None  # the app answers that at once
            if self.admission is not None and scope["path"] not in EXEMPT_PATHS and not client_left:
                if not await self.admission.enter():  # a body has arrived: stalled uploads hold no slot
                    await self._refuse_overloaded(scope, send_with_id)
                    return
                working = True
            try:
                if body is not None and self.fast is not None and self.fast.applies(scope):
                    answer = await self.fast(scope, headers.get("content-type"), body)
                    if answer is not None:
                        await answer(scope, receive, send_with_id)
                        return
                await self.app(scope, app_receive, send_with_id)
            except Exception:
                log.exception("unhandled error in %s %s (request %s)", scope["method"], scope["path"], request_id)
                if response["started"]:
                    raise
                self.metrics.rejected.labels(reason="internal_error").inc()
                body = error_response(500, f"internal error (request id {request_id})", "internal_error")
                await body(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels requests still running when its graceful-shutdown timeout ends (e.g. a
            # stalled upload); answer them with a typed 503 instead of its traceback and bare 500.
            if response["started"]:
                raise
            log.warning("%s %s cancelled by shutdown (request %s)", scope["method"], scope["path"], request_id)
            self.metrics.rejected.labels(reason="shutting_down").inc()
            gone = error_response(
                503, "the service is shutting down; retry on another replica", "shutting_down", None,
                {"Connection": "close"},
            )  # fmt: skip
            await gone(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
            if working:
                assert self.admission is not None
                self.admission.leave()
            self.in_flight.count -= 1
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            endpoint = endpoint_label(scope)
            status = response["status"]
            self.metrics.request_duration.labels(endpoint=endpoint, method=scope["method"], status=str(status)).observe(
                elapsed
            )
            if self.access:
                access_log.info(
                    "%s %s %s",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                    },
                )

    async def _refuse_overloaded(self, scope: Scope, send: Send) -> None:
        """429 before the body is parsed: pre-encoded bytes, the cheapest answer the service can give."""
        start, body = self._overloaded
        await send(start)
        await send(body)
        self.metrics.rejected.labels(reason="overloaded").inc()

    def _check_length(self, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            length = int(value)
        except ValueError:
            return None  # the server rejects a malformed Content-Length itself
        if length > self.max_body_bytes:
            return f"request body is {length} bytes, over the {self.max_body_bytes}-byte limit"
        return None

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body (bounded by max_body_bytes), or None if the client disconnected first."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    body = message.get("body", b"")
                    size += len(body)
                    if size > self.max_body_bytes:
                        raise _BodyTooLarge
                    chunks.append(body)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise _BodyTimeout from None


def _replay(body: bytes | None, receive: Receive) -> Receive:
    """Hand a buffered body (None: a disconnect) to the app as one message, then the live channel."""
    replay: list[Message] = [{"type": "http.disconnect"} if body is None else {"type": "http.request", "body": body}]

    async def replay_receive() -> Message:
        if replay:
            return replay.pop(0)
        return await receive()

    return replay_receive
