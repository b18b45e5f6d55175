"""Items that arrive live: `POST /items` adds or replaces items by id, `DELETE /items/{item_id}` removes one.

Both need the admin key (`service.admin.require_admin`). A new item is featurised exactly as export
featurised the catalog (the bundle's own text encoder, `Engine.item_inputs`, on a thread of its own so
searches do not wait for it), encoded by the bundled item encoder and upserted into the index backend
on the encode thread, so it is searchable as soon as the response arrives. Its score comes from its
content alone: an item outside the bundle has no trained ID row (the ID-aware recipe's cold path).

Where the change lives depends on the backend (`shared` in every answer): with FAISS it is this
replica's memory, lost on restart and on reload; with Milvus the vector is in the shared collection
and the item's id, row and features are in Redis (`service.registry`), so every replica serves it and
a restart keeps it.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from starlette.responses import Response

from service.admin import ADMIN_RESPONSES, require_admin
from service.engine import BadItems, Engine, NewItem
from service.errors import ErrorType, ServiceError, domain_error
from service.history import RedisUnavailable
from service.index import IndexUnavailable
from service.responses import json_response
from service.schemas import (
    MAX_ID_CHARS,
    PATH_ID_PATTERN,
    DeletedItem,
    ItemsRequest,
    ItemsResponse,
    NewItemBody,
    check_id,
)
from service.searching import check_count
from service.state import ServiceState

router = APIRouter(prefix="/items", tags=["items"], dependencies=[Depends(require_admin)])

ITEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    **{code: spec for code, spec in ADMIN_RESPONSES.items() if code != 409},
    404: {"model": ADMIN_RESPONSES[401]["model"], "description": "DELETE: the item is not served."},
    409: {"model": ADMIN_RESPONSES[401]["model"], "description": "The bundle ships no text encoder."},
    422: {"model": ADMIN_RESPONSES[401]["model"], "description": "Bad item body: the field at fault is named."},
    503: {"model": ADMIN_RESPONSES[401]["model"], "description": "Not ready, or the index backend (or Redis) is down."},
}

ItemIdPath = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS, json_schema_extra={"pattern": PATH_ID_PATTERN})]


def _where(shared: bool) -> str:
    if shared:
        return "in the shared index: every replica serves it, and restarts keep it"
    return "in this replica's memory only: other replicas do not see it, and a restart or reload loses it"


def _check_not_reloaded(svc: ServiceState, engine: Engine) -> None:
    """A change written into an engine that a reload replaced meanwhile is not served: say so (409), never 200.
    (A shared index of the same model is fine: the new engine replays the change from the registry.)"""
    now = svc.engine
    if now is engine or (now is not None and engine.index.shared and now.model_version == engine.model_version):
        return
    raise ServiceError(
        ErrorType.RELOAD_IN_PROGRESS,
        f"the served bundle was reloaded (to {now.model_version if now else 'none'}) while this change was "
        f"written into {engine.model_version}: send it again",
    )


def new_items(engine: Engine, bodies: list[NewItemBody], limit: int) -> list[NewItem]:
    """Check the bodies against the served bundle (text fields, visual width); 422 naming the field."""
    check_count(len(bodies), "items", limit, "max_upsert_items")
    fields = engine.manifest.item_text_fields
    last = {body.item_id: i for i, body in enumerate(bodies)}  # an id given twice: the later one counts
    out: list[NewItem] = []
    for i, body in enumerate(bodies):
        where = f"items[{i}]"
        if last[body.item_id] != i:
            continue
        if isinstance(body.text, str):
            if not fields and body.text:
                raise ServiceError(
                    ErrorType.VALIDATION_ERROR, "this bundle's catalog has no text fields", f"{where}.text"
                )
            text = {fields[0]: body.text} if fields else {}
        else:
            unknown = [name for name in body.text if name not in fields]
            if unknown:
                raise ServiceError(
                    ErrorType.VALIDATION_ERROR,
                    f"{where}.text has the field {unknown[0]!r}; this bundle's text fields are {fields}",
                    f"{where}.text.{unknown[0]}",
                )
            text = dict(body.text)
        if body.visual is not None:
            width = engine.visual_dim
            if width is None:
                raise ServiceError(
                    ErrorType.VALIDATION_ERROR, "this bundle has no visual feature block", f"{where}.visual"
                )
            if len(body.visual) != width:
                raise ServiceError(
                    ErrorType.VALIDATION_ERROR,
                    f"{where}.visual has {len(body.visual)} values, this bundle's visual block has {width}",
                    f"{where}.visual",
                )
        out.append(NewItem(body.item_id, text, text.get("title"), body.visual))
    return out


@router.post("", response_model=ItemsResponse, responses=ITEM_RESPONSES, summary="Add or replace items live")
async def upsert_items(body: ItemsRequest, request: Request) -> Response:
    """Featurise each item with the bundle's text encoder, encode it with the item tower and upsert it into the
    index; searchable when this answers. An id already served is replaced under the same row."""
    svc: ServiceState = request.app.state.svc
    engine, batcher = svc.serving()
    if not engine.accepts_items:
        raise ServiceError(
            ErrorType.ITEMS_NOT_SUPPORTED,
            f"bundle {engine.model_version} ships no item text encoder (exported with --no-text-encoder): "
            "re-export it to add items live",
        )
    items = new_items(engine, body.items, svc.config.max_upsert_items)
    started = time.perf_counter()
    try:
        inputs = await engine.featurise_items(items)  # off the encode thread: searches go on
        if engine.index.shared:
            result = await svc.registry.upsert(engine, batcher, items, inputs)
        else:
            result = await batcher.run_in_worker(lambda: engine.upsert_items(items, None, inputs))
    except BadItems as exc:
        raise ServiceError(ErrorType.VALIDATION_ERROR, str(exc), exc.field) from None
    except (IndexUnavailable, RedisUnavailable) as exc:
        raise domain_error(exc, svc.config.retry_after_s) from None
    _check_not_reloaded(svc, engine)
    elapsed = time.perf_counter() - started
    created = sum(c for _, c in result)
    svc.metrics.items_changed.labels(op="added").inc(created)
    svc.metrics.items_changed.labels(op="replaced").inc(len(result) - created)
    return json_response(
        {
            "items": [
                {"item_id": item.item_id, "row": row, "created": c}
                for item, (row, c) in zip(items, result, strict=True)
            ],
            "model_version": engine.model_version,
            "backend": engine.index.name,
            "shared": engine.index.shared,
            "note": f"{len(items)} item(s) {_where(engine.index.shared)}",
            "timings_ms": {"total": round(elapsed * 1000, 3)},
        }
    )


@router.delete(
    "/{item_id}", response_model=DeletedItem, responses=ITEM_RESPONSES, summary="Remove an item from the index"
)
async def delete_item(item_id: ItemIdPath, request: Request) -> Response:
    """The item leaves the index (no search returns it); users who clicked it keep it in their history."""
    svc: ServiceState = request.app.state.svc
    try:
        check_id(item_id, "item_id")
    except ValueError as exc:
        raise ServiceError(ErrorType.VALIDATION_ERROR, str(exc), "item_id") from None
    engine, batcher = svc.serving()
    try:
        if engine.index.shared:
            row = await svc.registry.delete(engine, batcher, item_id)
        else:
            row = await batcher.run_in_worker(lambda: engine.delete_item(item_id))
    except (IndexUnavailable, RedisUnavailable) as exc:
        raise domain_error(exc, svc.config.retry_after_s) from None
    _check_not_reloaded(svc, engine)
    if row is None:
        raise ServiceError(ErrorType.ITEM_NOT_FOUND, f"item {item_id!r} is not served", "item_id")
    svc.metrics.items_changed.labels(op="deleted").inc()
    return json_response(
        {
            "item_id": item_id,
            "row": row,
            "model_version": engine.model_version,
            "backend": engine.index.name,
            "shared": engine.index.shared,
            "note": f"deleted {_where(engine.index.shared)}",
        }
    )
