"""How uvicorn runs the app: connection limits, timeouts and the header-timeout protocol.

uvicorn closes idle keep-alive connections but has no timeout for a request head that arrives a
byte at a time (slowloris): such connections stay open forever and count against its connection
limit. `HeaderTimeoutProtocol` arms a timer when a connection opens and when a request begins,
cancels it when the head is complete, and closes the connection if it fires first. The body has its
own timeout in `ServiceMiddleware` (408).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from karma.config import ServeConfig
from service.metrics import Metrics


def header_timeout_protocol(timeout_s: float, on_bad_request: Callable[[], Any] | None = None) -> type | str:
    """uvicorn's httptools protocol with a request-head timeout ("auto" where httptools is missing).

    `on_bad_request` is called for every request the HTTP parser refuses with 400 before the app
    sees it (so those appear in /metrics too).
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pure-Python install: uvicorn's h11 protocol, without the head timeout
        return "auto"

    class HeaderTimeoutProtocol(HttpToolsProtocol):  # type: ignore[misc]
        _head_timer: Any = None

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.keep_alive = False  # a pipelined earlier request is still answering: close after it
            elif not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._disarm_head_timer()
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            if on_bad_request is not None:
                on_bad_request()
            super().send_400_response(msg)

    return HeaderTimeoutProtocol


def uvicorn_options(config: ServeConfig, metrics: Metrics | None = None) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config` that every way of serving shares."""
    bad = None if metrics is None else metrics.rejected.labels(reason="bad_http_request").inc
    return {
        "host": config.host,
        "port": config.port,
        "http": header_timeout_protocol(config.header_timeout_s, bad),
        "limit_concurrency": config.max_connections,
        "timeout_keep_alive": 5,
        "timeout_graceful_shutdown": max(1, int(config.drain_timeout_s)),
        "log_config": None,
        "access_log": False,  # the service writes its own JSON access log with request ids
        "lifespan": "on",
    }
