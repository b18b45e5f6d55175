"""The HTTP endpoints. Each handler is thin: validate, read Redis if needed, hand work to the batcher."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Path, Request
from starlette.responses import PlainTextResponse, Response

from service.errors import ErrorType, ServiceError, error_response
from service.history import RedisUnavailable
from service.metrics import CONTENT_TYPE
from service.responses import json_response
from service.schemas import (
    ERROR_RESPONSES,
    MAX_ID_CHARS,
    PATH_ID_PATTERN,
    BatchSearchRequest,
    BatchSearchResponse,
    EmbedRequest,
    EmbedResponse,
    EventRequest,
    EventResponse,
    HistoryResponse,
    OpenAIEmbeddingsRequest,
    OpenAIEmbeddingsResponse,
    SearchRequest,
    SearchResponse,
    check_id,
)
from service.searching import redis_down, run_embed, run_openai_embeddings, run_search, run_search_batch
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


def _user_id(user_id: str) -> str:
    try:
        return check_id(user_id, "user_id")
    except ValueError as exc:
        raise ServiceError(ErrorType.VALIDATION_ERROR, str(exc), "user_id") from None


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


@router.post(
    "/search/batch",
    response_model=BatchSearchResponse,
    responses=ERROR_RESPONSES,
    summary="Many searches in one request",
)
async def search_batch(body: BatchSearchRequest, request: Request) -> Response:
    """Each of `inputs` is a `/search` body; the answer has one `/search` result per input, in order.

    The inputs are encoded in the same micro-batches as concurrent `/search` requests, so each ranks
    exactly as it would alone. One failing input (e.g. a user with no history and no query) fails the
    request with the error naming it (`field: inputs[3].query`); a queue without room for all inputs
    answers 429 before any is queued.
    """
    return await run_search_batch(_svc(request), body, request.scope["state"]["t0"])


@router.post("/embed", response_model=EmbedResponse, responses=ERROR_RESPONSES, summary="h_t and item vectors")
async def embed(body: EmbedRequest, request: Request) -> Response:
    """The next-interest embedding h_t per input (what `/search` searches the index with, unit length)
    and the index's vectors for `item_ids`: score(item) = h_t · item_vector.

    With `encoding_format: base64` each vector is little-endian float32 bytes in base64 (OpenAI's
    format; 4 bytes per value instead of ~20 characters of JSON).
    """
    return await run_embed(_svc(request), body, request.scope["state"]["t0"])


@router.post(
    "/v1/embeddings",
    response_model=OpenAIEmbeddingsResponse,
    responses=ERROR_RESPONSES,
    summary="h_t in OpenAI's embeddings API shape",
)
async def openai_embeddings(body: OpenAIEmbeddingsRequest, request: Request) -> Response:
    """OpenAI-compatible: `input` is one query or a list; `user` (optional) is the user id whose stored
    history conditions each h_t. Errors keep this service's `{"error", "type", "field"}` body."""
    return await run_openai_embeddings(_svc(request), body, request.scope["state"]["t0"])


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
        raise ServiceError(ErrorType.UNKNOWN_ITEMS, f"item {body.item_id!r} is not in the catalog", "item_id")
    try:
        stored = await svc.history.append(
            body.user_id, body.item_id, body.epoch_seconds(time.time()), svc.config.history_max_events, body.event_id
        )
    except RedisUnavailable as exc:
        raise redis_down(svc, exc) from None
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
        raise redis_down(svc, exc) from None
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
        raise redis_down(svc, exc) from None
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
