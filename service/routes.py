"""The HTTP endpoints. Each handler is thin: validate, read Redis if needed, hand work to the batcher."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from starlette.responses import PlainTextResponse, Response

from service.batching import BatcherStopped, QueueFull
from service.errors import ServiceError, error_response
from service.history import RedisUnavailable
from service.metrics import CONTENT_TYPE
from service.schemas import (
    ERROR_RESPONSES,
    MAX_ID_CHARS,
    PATH_ID_PATTERN,
    EventRequest,
    EventResponse,
    HistoryResponse,
    SearchRequest,
    SearchResponse,
    check_id,
)
from service.state import ServiceState

router = APIRouter()

UserIdPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_ID_CHARS,
        description="The user's id (an id with '/' cannot be addressed in a path).",
        json_schema_extra={"pattern": PATH_ID_PATTERN},
    ),
]


def _svc(request: Request) -> ServiceState:
    return request.app.state.svc


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _redis_down(svc: ServiceState, exc: RedisUnavailable) -> ServiceError:
    return ServiceError(
        503,
        "redis_unavailable",
        f"user history store (Redis) is unavailable: {exc}; requests that carry 'history' still work",
        headers={"Retry-After": str(svc.config.retry_after_s)},
    )


def _user_id(user_id: str) -> str:
    try:
        return check_id(user_id, "user_id")
    except ValueError as exc:
        raise ServiceError(422, "validation_error", str(exc), "user_id") from None


@router.post(
    "/search",
    response_model=SearchResponse,
    responses=ERROR_RESPONSES,
    summary="Top-k items for a query and/or a click history",
)
async def search(body: SearchRequest, request: Request) -> Response:
    """Encode (query, history) into h_t with the ONNX query tower (micro-batched), then FAISS top-k.

    Without `history`, the user's history is read from Redis by `user_id`. If Redis is down, a request
    with a query is ranked by the query alone (`degraded: true`, with `degraded_reason`); one without a
    query gets 503 `redis_unavailable`.
    Stage timings come back in `timings_ms` and as `X-<Stage>-Time` headers (milliseconds).
    """
    # Valid requests normally take service.fastpath (same model, same code below, no FastAPI
    # dispatch); this route documents the API and answers every request the fast path declines.
    return await run_search(_svc(request), body, request.scope["state"]["t0"])


async def run_search(svc: ServiceState, body: SearchRequest, started: float) -> Response:
    """The /search work after validation; `started` is the request's arrival (perf_counter)."""
    engine, batcher = svc.serving()
    config = svc.config

    raw_query = body.query or ""
    if len(raw_query) > config.max_query_chars:
        raise ServiceError(
            422,
            "validation_error",
            f"query is {len(raw_query)} characters, over the {config.max_query_chars} limit",
            "query",
        )
    query = raw_query.strip()

    t = time.perf_counter()
    from_redis = body.history is None and body.user_id is not None
    degraded: str | None = None
    if body.history is not None:
        ids: list[str] = body.history
    elif body.user_id is not None:
        try:
            ids = await svc.history.read_item_ids(body.user_id, engine.max_history)
        except RedisUnavailable as exc:
            if not query:
                raise _redis_down(svc, exc) from None
            # The query alone still finds something relevant: serve it, and say the history was missing.
            ids = []
            degraded = f"user history unavailable (Redis: {exc}); ranked by the query alone"
            svc.metrics.degraded.inc()
    else:
        ids = []
    history_s = time.perf_counter() - t

    t = time.perf_counter()
    row_of = engine.row_of
    rows: list[int] = []
    unknown: dict[str, None] = {}
    for item in ids:
        row = row_of.get(item)
        if row is None:
            unknown[item] = None
        else:
            rows.append(row)
    truncated = max(0, len(rows) - engine.max_history)
    used = rows[truncated:]
    if not used and not query:
        if unknown:
            raise ServiceError(
                422,
                "unknown_items",
                f"none of the {len(ids)} history item(s) is in the catalog (first: {next(iter(unknown))!r}) "
                "and there is no query",
                "history",
            )
        if from_redis:
            raise ServiceError(
                422, "no_history", f"user {body.user_id!r} has no stored history and there is no query", "query"
            )
        raise ServiceError(
            422,
            "validation_error",
            "nothing to search with: give a query, a history, or a user_id with history",
            "query",
        )
    job = engine.make_job(query, rows, body.k, body.exclude_history)
    resolve_s = time.perf_counter() - t

    try:
        result = await batcher.submit(engine, job)
    except QueueFull as exc:
        raise ServiceError(
            429, "queue_full", f"{exc}; retry later", headers={"Retry-After": str(config.retry_after_s)}
        ) from None
    except BatcherStopped as exc:
        raise ServiceError(503, "not_ready", str(exc), headers={"Retry-After": str(config.retry_after_s)}) from None

    item_ids, titles = engine.item_ids, engine.titles
    items = [
        {"item_id": item_ids[r], "score": s, "title": titles[r] if titles is not None else None}
        for r, s in zip(result.rows.tolist(), result.scores.tolist(), strict=True)
    ]
    seconds = {
        "history": history_s,
        "featurize": resolve_s + result.seconds["featurize"],
        "queue": result.seconds["queue"],
        "encode": result.seconds["encode"],
        "search": result.seconds["search"],
    }
    seconds["total"] = time.perf_counter() - started
    svc.metrics.observe_stages(seconds)
    timings = {stage: round(value * 1000, 4) for stage, value in seconds.items()}
    payload = {
        "items": items,
        "model_version": engine.model_version,
        "timings_ms": timings,
        "history_used": len(used),
        "history_truncated": truncated,
        "unknown_items": list(unknown),
        "batch_size": result.batch_size,
        "query_truncated": result.query_truncated,
        "degraded": degraded is not None,
    }
    if degraded is not None:
        payload["degraded_reason"] = degraded
    headers = {f"X-{stage.capitalize()}-Time": f"{value:.3f}" for stage, value in timings.items()}
    headers["Server-Timing"] = ", ".join(f"{stage};dur={value:.3f}" for stage, value in timings.items())
    headers["X-Model-Version"] = engine.model_version
    return json_response(payload, headers=headers)


@router.post("/events", response_model=EventResponse, responses=ERROR_RESPONSES, summary="Record a click")
async def post_event(body: EventRequest, request: Request) -> Response:
    """Append a click to the user's history in Redis (atomic; the oldest beyond `serve.history_max_events` dropped).

    The item must be in the served catalog (422 `unknown_items` otherwise). Send an `event_id` to make
    retries safe: a second event with the same id (within `serve.event_id_ttl_s`) stores nothing and
    answers `duplicate: true`.
    """
    svc = _svc(request)
    engine, _ = svc.serving()
    if body.item_id not in engine.row_of:
        raise ServiceError(422, "unknown_items", f"item {body.item_id!r} is not in the catalog", "item_id")
    try:
        stored = await svc.history.append(
            body.user_id, body.item_id, body.epoch_seconds(time.time()), svc.config.history_max_events, body.event_id
        )
    except RedisUnavailable as exc:
        raise _redis_down(svc, exc) from None
    return json_response(
        {
            "user_id": body.user_id,
            "item_id": body.item_id,
            "history_length": stored.length,
            "event_id": stored.event_id,
            "duplicate": stored.duplicate,
        }
    )


@router.get(
    "/users/{user_id}/history", response_model=HistoryResponse, responses=ERROR_RESPONSES, summary="A user's clicks"
)
async def get_history(user_id: UserIdPath, request: Request) -> Response:
    """The stored history, oldest first (an unknown user has an empty one)."""
    svc = _svc(request)
    engine, _ = svc.serving()
    user_id = _user_id(user_id)
    try:
        events = await svc.history.read(user_id, svc.config.history_max_events)
    except RedisUnavailable as exc:
        raise _redis_down(svc, exc) from None
    items = [{"item_id": e.item_id, "timestamp": e.timestamp} for e in events]
    return json_response(
        {
            "user_id": user_id,
            "items": items,
            "max_events": svc.config.history_max_events,
            "max_history": engine.max_history,
        }
    )


@router.delete("/users/{user_id}/history", responses=ERROR_RESPONSES, summary="Forget a user's clicks")
async def delete_history(user_id: UserIdPath, request: Request) -> Response:
    svc = _svc(request)
    svc.serving()
    user_id = _user_id(user_id)
    try:
        deleted = await svc.history.clear(user_id)
    except RedisUnavailable as exc:
        raise _redis_down(svc, exc) from None
    return json_response({"user_id": user_id, "deleted": deleted})


@router.head("/healthz", include_in_schema=False)  # load balancers probe with HEAD
@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    """200 while the process runs (readiness is /readyz)."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: bundle, encoder (a real probe inference), index, Redis")
async def readyz(request: Request) -> Response:
    svc = _svc(request)
    checks, reasons = await svc.readiness()
    if reasons:
        return error_response(
            503,
            "not ready: " + "; ".join(reasons),
            "not_ready",
            None,
            {"Retry-After": str(svc.config.retry_after_s)},
            checks=checks,
        )
    return json_response({"ready": True, "model_version": svc.engine.model_version, "checks": checks})


@router.get("/info", summary="The served bundle, runtime and batching settings")
async def info(request: Request) -> Response:
    return json_response(_svc(request).info())


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Text format 1.0.0."}},
)
async def metrics(request: Request) -> Response:
    return Response(_svc(request).metrics.render(), media_type=CONTENT_TYPE)
