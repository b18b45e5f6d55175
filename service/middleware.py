"""One pure-ASGI middleware for what every request needs (cheaper than Starlette's BaseHTTPMiddleware).

- a request id (the client's `X-Request-Id` if sane, else a new one), echoed in the response;
- the body-size limit: bodies over `max_body_bytes` get 413 before any parsing (Content-Length is
  checked first; chunked bodies are counted while read);
- the fast path for valid `POST /search` requests (service.fastpath), which needs the buffered body;
- in-flight accounting, so shutdown can drain;
- `karma_request_duration_seconds{endpoint,method,status}` and one JSON access-log line;
- the last line of defence: an exception that escaped every handler is a bug, logged with its
  traceback and answered with a typed 500 (never a bare one).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response
from service.logs import request_id_var
from service.metrics import Metrics

if TYPE_CHECKING:
    from service.fastpath import FastSearch

log = logging.getLogger("karma.service")
access_log = logging.getLogger("karma.service.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_BODY_METHODS = {"POST", "PUT", "PATCH"}


class _BodyTooLarge(Exception):
    pass


class InFlight:
    """Counts requests being handled (shutdown waits for zero)."""

    def __init__(self) -> None:
        self.count = 0


class ServiceMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        in_flight: InFlight,
        max_body_bytes: int,
        access: bool,
        fast: FastSearch | None = None,
    ):
        self.app = app
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
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        self.in_flight.count += 1
        self.metrics.in_flight.inc()
        try:
            app_receive = receive
            body: bytes | None = None
            if scope["method"] in _BODY_METHODS:
                refused = self._check_length(headers.get("content-length"))
                if refused is None:
                    try:
                        body = await self._read_body(receive)
                    except _BodyTooLarge:
                        refused = f"request body is over the {self.max_body_bytes}-byte limit"
                if refused is not None:
                    self.metrics.rejected.labels(reason="payload_too_large").inc()
                    await error_response(413, refused, "payload_too_large", "body")(scope, receive, send_with_id)
                    return
                app_receive = _replay(body, receive)
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
        finally:
            request_id_var.reset(token)
            self.in_flight.count -= 1
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
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


def _replay(body: bytes | None, receive: Receive) -> Receive:
    """Hand a buffered body (None: a disconnect) to the app as one message, then the live channel."""
    replay: list[Message] = [{"type": "http.disconnect"} if body is None else {"type": "http.request", "body": body}]

    async def replay_receive() -> Message:
        if replay:
            return replay.pop(0)
        return await receive()

    return replay_receive
