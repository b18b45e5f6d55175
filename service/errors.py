"""Every error the service returns, mapped in one place to `{"error", "type", "field"}`.

| status | type | when |
|---|---|---|
| 401 | `unauthorized` | admin route without the right bearer key; public route without `serve.api_key` (when set) |
| 403 | `admin_disabled` | admin route while no `serve.admin_api_key` is configured |
| 404 | `not_found` | no such route |
| 405 | `method_not_allowed` | wrong HTTP method |
| 408 | `body_timeout` | the request body did not arrive within `serve.body_timeout_s` |
| 413 | `payload_too_large` | body over `serve.max_body_bytes` (refused before parsing) |
| 422 | `invalid_json` | malformed JSON, a body that is not UTF-8, or JSON nested too deeply to parse |
| 422 | `validation_error` | wrong types, missing fields, `k` out of range, junk in a query, nothing to search with |
| 404 | `item_not_found` | `DELETE /items/{item_id}` of an item not served (or already deleted) |
| 409 | `reload_in_progress` | `/admin/reload` while another runs; `/items` changes a reload overtook (resend) |
| 409 | `items_not_supported` | `POST /items` on a bundle exported without its text encoder (`--no-text-encoder`) |
| 422 | `unknown_items` | an `/events` or `/embed` item not in the bundle; a history with no known item and no query |
| 422 | `no_history` | a search or embedding by `user_id` alone, and the user has no stored history |
| 422 | `unsupported_dimensions` | `/v1/embeddings` `dimensions` other than the served model's |
| 422 | `invalid_bundle` | `/admin/reload` of a bundle that fails a check (the old one keeps serving) |
| 429 | `queue_full` | the encoder queue is full, or has no room for all of a batch's inputs (with `Retry-After`) |
| 429 | `overloaded` | over `serve.max_concurrent_requests` at work; refused before the body is read |
| 503 | `not_ready` | starting up or draining; `/admin/reload` stopped by shutdown |
| 503 | `shutting_down` | a request (e.g. a stalled upload) still unanswered when the graceful-shutdown timeout ends |
| 503 | `redis_unavailable` | the request needs Redis and Redis is down (with `Retry-After`) |
| 503 | `index_unavailable` | `serve.index_backend=milvus` and Milvus did not answer in `serve.milvus_timeout_s` |
| 400 | `bad_http_request` | bytes the HTTP parser refuses (answered by uvicorn; counted, no body type) |
| 500 | `internal_error` | a bug: logged with its traceback; never caused by client input |

A many-input request (`/search/batch`, `/embed`, `/v1/embeddings`) fails whole on its first failing
input, with `field` naming it (`inputs[3].query`, `input[1]`).

Each rejection is counted in `karma_rejected_total{reason=<type>}`.
"""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from service.responses import json_response

log = logging.getLogger("karma.service")

_HTTP_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "queue_full",
    503: "not_ready",
}


class ErrorType(StrEnum):
    """Every `type` an error body can carry (the table above), with its HTTP status in STATUS."""

    UNAUTHORIZED = "unauthorized"
    ADMIN_DISABLED = "admin_disabled"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BODY_TIMEOUT = "body_timeout"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    INVALID_JSON = "invalid_json"
    VALIDATION_ERROR = "validation_error"
    RELOAD_IN_PROGRESS = "reload_in_progress"
    ITEM_NOT_FOUND = "item_not_found"
    ITEMS_NOT_SUPPORTED = "items_not_supported"
    UNKNOWN_ITEMS = "unknown_items"
    NO_HISTORY = "no_history"
    UNSUPPORTED_DIMENSIONS = "unsupported_dimensions"
    INVALID_BUNDLE = "invalid_bundle"
    QUEUE_FULL = "queue_full"
    OVERLOADED = "overloaded"
    NOT_READY = "not_ready"
    SHUTTING_DOWN = "shutting_down"
    REDIS_UNAVAILABLE = "redis_unavailable"
    INDEX_UNAVAILABLE = "index_unavailable"
    INTERNAL_ERROR = "internal_error"


STATUS: dict[ErrorType, int] = {
    ErrorType.UNAUTHORIZED: 401,
    ErrorType.ADMIN_DISABLED: 403,
    ErrorType.NOT_FOUND: 404,
    ErrorType.METHOD_NOT_ALLOWED: 405,
    ErrorType.BODY_TIMEOUT: 408,
    ErrorType.RELOAD_IN_PROGRESS: 409,
    ErrorType.ITEM_NOT_FOUND: 404,
    ErrorType.ITEMS_NOT_SUPPORTED: 409,
    ErrorType.PAYLOAD_TOO_LARGE: 413,
    ErrorType.INVALID_JSON: 422,
    ErrorType.VALIDATION_ERROR: 422,
    ErrorType.UNKNOWN_ITEMS: 422,
    ErrorType.NO_HISTORY: 422,
    ErrorType.UNSUPPORTED_DIMENSIONS: 422,
    ErrorType.INVALID_BUNDLE: 422,
    ErrorType.QUEUE_FULL: 429,
    ErrorType.OVERLOADED: 429,
    ErrorType.NOT_READY: 503,
    ErrorType.SHUTTING_DOWN: 503,
    ErrorType.REDIS_UNAVAILABLE: 503,
    ErrorType.INDEX_UNAVAILABLE: 503,
    ErrorType.INTERNAL_ERROR: 500,
}


class ServiceError(Exception):
    """An expected failure: its type (which fixes the HTTP status) and, optionally, the request field at fault."""

    def __init__(
        self,
        type_: ErrorType,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = STATUS[type_]
        self.type = str(type_)
        self.message = message
        self.field = field
        self.headers = headers or {}
        self.extra = extra or {}


def retry_after(seconds: int) -> dict[str, str]:
    return {"Retry-After": str(seconds)}


def domain_error(exc: Exception, retry_after_s: int) -> ServiceError:
    """The one table from the engine's and stores' exceptions to HTTP errors (callers `raise ... from None`)."""
    from service.batching import BatcherStopped, QueueFull
    from service.history import RedisUnavailable
    from service.index import IndexUnavailable

    if isinstance(exc, QueueFull):
        return ServiceError(ErrorType.QUEUE_FULL, f"{exc}; retry later", headers=retry_after(retry_after_s))
    if isinstance(exc, BatcherStopped):
        return ServiceError(ErrorType.NOT_READY, str(exc), headers=retry_after(retry_after_s))
    if isinstance(exc, RedisUnavailable):
        return ServiceError(
            ErrorType.REDIS_UNAVAILABLE,
            f"user history store (Redis) is unavailable: {exc}; requests that carry 'history' still work",
            headers=retry_after(retry_after_s),
        )
    if isinstance(exc, IndexUnavailable):
        return ServiceError(ErrorType.INDEX_UNAVAILABLE, str(exc), headers=retry_after(retry_after_s))
    raise TypeError(f"no HTTP mapping for {type(exc).__name__}") from exc


def error_body(message: str, type_: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": message, "type": type_, "field": field, **extra}


def error_response(
    status: int,
    message: str,
    type_: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    """A JSON error response (built by hand so it also works outside FastAPI, in the ASGI middleware)."""
    return json_response(error_body(message, type_, field, **extra), status, headers)


def service_error_response(exc: ServiceError, metrics: Any | None) -> Response:
    """The response for a ServiceError, counted in karma_rejected_total (also used outside FastAPI)."""
    if metrics is not None:
        metrics.rejected.labels(reason=exc.type).inc()
    return error_response(exc.status, exc.message, exc.type, exc.field, exc.headers, **exc.extra)


def _count(request: Request, reason: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.rejected.labels(reason=reason).inc()


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """('body', 'history', 3) -> 'history[3]'; ('body', 12) (a JSON position) -> 'body'."""
    parts = list(loc)
    if parts and parts[0] in {"body", "query", "path", "header"}:
        source, parts = parts[0], parts[1:]
    else:
        source = None
    name = ""
    for part in parts:
        if isinstance(part, int):
            if name:  # a list index; a bare int right after 'body' is a JSON character position
                name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or source


def _validation_message(err: dict[str, Any], field: str | None) -> tuple[str, str]:
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        where = err["loc"][1] if len(err.get("loc", ())) > 1 else None
        at = f" at character {where}" if isinstance(where, int) else ""
        return f"malformed JSON{at}: {detail}".rstrip(": "), "invalid_json"
    if kind == "missing" and field in {None, "body"}:
        return "a JSON request body is required", "validation_error"
    if kind == "extra_forbidden":
        return f"unknown field '{field}'", "validation_error"
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    return (f"{field}: {msg}" if field else msg), "validation_error"


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def _unparseable_body(request: Request) -> str:
    """Why json.loads failed on a body (ServiceMiddleware keeps the buffered body in the scope's state)."""
    body = request.scope.get("state", {}).get("body")
    if isinstance(body, bytes):
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"the request body is not valid UTF-8 (byte {exc.start})"
        return "the request body is JSON nested too deeply to parse (or otherwise unreadable)"
    return "the request body is not valid UTF-8 JSON"


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; unexpected exceptions are turned into typed 500s by the ASGI middleware."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        return service_error_response(exc, getattr(request.app.state, "metrics", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = list(exc.errors())
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = _field_of(first.get("loc", ()))
        message, type_ = _validation_message(first, field)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        _count(request, type_)
        return error_response(422, message, type_, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        type_ = _HTTP_TYPES.get(status, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        field = None
        headers = dict(exc.headers or {})
        if status == 404:
            detail = f"no route {request.method} {request.url.path}"
        elif status == 405:
            headers["Allow"] = _allowed_methods(request)
        elif status == 400 and detail == "There was an error parsing the body":
            # FastAPI's answer to a body json.loads cannot decode (e.g. bytes that are not UTF-8):
            # the same kind of client error as malformed JSON, so the same status and type.
            status, type_, field = 422, "invalid_json", "body"
            detail = _unparseable_body(request)
        _count(request, type_)
        return error_response(status, detail, type_, field, headers)
