"""The work behind the search and embedding routes, after validation: one path for every caller.

`prepare` turns one (user_id, query, history) input into an encoder `Job` — query limits, the
Redis read (degrading to the query alone when Redis is down), item-id resolution, truncation and
exclusions — and `submit` queues it on the micro-batcher. `POST /search` runs one input,
`/search/batch`, `/embed` and `/v1/embeddings` run many: their inputs are submitted together, so
they join the same encoder batches as concurrent single requests and rank exactly as those would.
A failing input fails its whole request, with the error naming it (`inputs[3].query`).
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.responses import Response

from service.batching import BatcherStopped, MicroBatcher, QueueFull
from service.engine import Engine, JobResult
from service.errors import ErrorType, ServiceError, domain_error
from service.history import RedisUnavailable
from service.index import IndexUnavailable
from service.responses import json_response
from service.schemas import BatchSearchRequest, EmbedRequest, OpenAIEmbeddingsRequest, SearchRequest
from service.state import ServiceState


@dataclass
class Prepared:
    """One input resolved for the encoder, with what its response reports about it."""

    job: Any  # service.engine.Job
    used: int  # history rows the model reads
    truncated: int  # known history rows left out (older than max_history)
    unknown: list[str]  # history ids not in the catalog, skipped
    degraded: str | None  # why the stored history was not used (Redis down), else None
    started: float  # perf_counter when the Redis read began (tracing spans)
    history_s: float  # the Redis read
    resolve_s: float  # id resolution and job building


def redis_down(svc: ServiceState, exc: RedisUnavailable) -> ServiceError:
    return domain_error(exc, svc.config.retry_after_s)


def _named(exc: ServiceError, where: str) -> ServiceError:
    """`exc` as raised for input `where` of a many-input request (`inputs[2]`): field and message name it."""
    field = f"{where}.{exc.field}" if exc.field else where
    return ServiceError(ErrorType(exc.type), f"{where}: {exc.message}", field, exc.headers, exc.extra)


async def prepare(
    svc: ServiceState,
    engine: Engine,
    user_id: str | None,
    raw_query: str | None,
    history: list[str] | None,
    k: int,
    exclude_history: bool,
    query_field: str = "query",
    reader: Any = None,
) -> Prepared:
    """The Job for one input (k = 0: embed only). Raises the input's ServiceError (422/503)."""
    config = svc.config
    raw_query = raw_query or ""
    if len(raw_query) > config.max_query_chars:
        raise ServiceError(
            ErrorType.VALIDATION_ERROR,
            f"{query_field} is {len(raw_query)} characters, over the {config.max_query_chars} limit",
            query_field,
        )
    query = raw_query.strip()

    t = started = time.perf_counter()
    from_redis = history is None and user_id is not None
    degraded: str | None = None
    if history is not None:
        ids: list[str] = history
    elif user_id is not None:
        try:
            ids = await (reader or svc.history.read_item_ids)(user_id, engine.max_history)
        except RedisUnavailable as exc:
            if not query:
                raise redis_down(svc, exc) from None
            # The query alone still finds something relevant: serve it, and say the history was missing.
            ids = []
            degraded = f"user history unavailable (Redis: {exc}); ranked by the query alone"
            svc.metrics.degraded.inc()
    else:
        ids = []
    history_s = time.perf_counter() - t

    t = time.perf_counter()
    rows, unknown = engine.resolve(ids)
    truncated = max(0, len(rows) - engine.max_history)
    if not rows and not query:
        if unknown:
            raise ServiceError(
                ErrorType.UNKNOWN_ITEMS,
                f"none of the {len(ids)} history item(s) is in the catalog (first: {unknown[0]!r}) "
                "and there is no query",
                "history",
            )
        if from_redis:
            raise ServiceError(
                ErrorType.NO_HISTORY, f"user {user_id!r} has no stored history and there is no query", query_field
            )
        raise ServiceError(
            ErrorType.VALIDATION_ERROR,
            "nothing to search with: give a query, a history, or a user_id with history",
            query_field,
        )
    job = engine.make_job(query, rows, k, exclude_history)
    resolve_s = time.perf_counter() - t
    return Prepared(job, len(rows) - truncated, truncated, unknown, degraded, started, history_s, resolve_s)


REDIS_READS_PER_REQUEST = 8  # a many-input request reads Redis at most this many keys at once


async def prepare_many(svc: ServiceState, engine: Engine, inputs: list[tuple[str, Any]]) -> list[Prepared]:
    """`prepare` for (name, args) inputs at once; the first failure, named. Each user's history is read once per
    request (inputs of one user share it), at most REDIS_READS_PER_REQUEST reads in flight."""
    reads: dict[str, asyncio.Future[list[str]]] = {}
    gate = asyncio.Semaphore(REDIS_READS_PER_REQUEST)

    async def read_once(user_id: str, n: int) -> list[str]:
        if user_id not in reads:

            async def read() -> list[str]:
                async with gate:
                    return await svc.history.read_item_ids(user_id, n)

            reads[user_id] = asyncio.ensure_future(read())
        return await asyncio.shield(reads[user_id])

    outcomes = await asyncio.gather(
        *(prepare(svc, engine, *args, reader=read_once) for _, args in inputs), return_exceptions=True
    )
    for future in reads.values():
        if future.done() and not future.cancelled():
            future.exception()  # retrieved: no "exception never retrieved" warning
    for (where, _), outcome in zip(inputs, outcomes, strict=True):
        if isinstance(outcome, ServiceError):
            raise _named(outcome, where) if where else outcome
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes  # type: ignore[return-value]  # every outcome is a Prepared here


async def submit(svc: ServiceState, batcher: MicroBatcher, engine: Engine, prepared: list[Prepared]) -> list[JobResult]:
    """Queue every job at once, or none, and wait for all (429 when the queue has no room for all of them now,
    422 when it never could, 503 when draining; a failing index answers 503 for the batch)."""
    if len(prepared) > batcher.queue.maxsize:
        raise ServiceError(
            ErrorType.VALIDATION_ERROR,
            f"inputs: {len(prepared)} inputs can never fit the encoder queue (serve.queue_size="
            f"{batcher.queue.maxsize}); send at most that many per request",
            "inputs",
        )
    try:
        futures = batcher.enqueue_many(engine, [p.job for p in prepared])
    except (QueueFull, BatcherStopped) as exc:
        raise domain_error(exc, svc.config.retry_after_s) from None
    try:
        results = list(await asyncio.gather(*futures))
    except (BatcherStopped, IndexUnavailable) as exc:
        raise domain_error(exc, svc.config.retry_after_s) from None
    finally:
        for future in futures:  # the client left or a sibling failed: the batcher skips what is done
            if not future.done():
                future.cancel()
    if svc.tracing is not None:
        for p, result in zip(prepared, results, strict=True):
            svc.tracing.stage_spans(p, result)
    return results


def stage_seconds(prepared: Prepared, result: JobResult, started: float) -> dict[str, float]:
    seconds = {
        "history": prepared.history_s,
        "featurize": prepared.resolve_s + result.seconds["featurize"],
        "queue": result.seconds["queue"],
        "encode": result.seconds["encode"],
        "search": result.seconds["search"],
    }
    seconds["total"] = time.perf_counter() - started
    return seconds


def _ms(seconds: dict[str, float]) -> dict[str, float]:
    return {stage: round(value * 1000, 4) for stage, value in seconds.items()}


def search_payload(engine: Engine, prepared: Prepared, result: JobResult, timings: dict[str, float]) -> dict[str, Any]:
    item_ids, titles = engine.item_ids, engine.titles
    items = [
        {"item_id": item_ids[r], "score": s, "title": titles[r] if titles is not None else None}
        for r, s in zip(result.rows.tolist(), result.scores.tolist(), strict=True)
    ]
    payload = {
        "items": items,
        "model_version": engine.model_version,
        "timings_ms": timings,
        "history_used": prepared.used,
        "history_truncated": prepared.truncated,
        "unknown_items": prepared.unknown,
        "batch_size": result.batch_size,
        "query_truncated": result.query_truncated,
        "degraded": prepared.degraded is not None,
    }
    if prepared.degraded is not None:
        payload["degraded_reason"] = prepared.degraded
    return payload


def timing_headers(engine: Engine, timings: dict[str, float]) -> dict[str, str]:
    headers = {f"X-{stage.capitalize()}-Time": f"{value:.3f}" for stage, value in timings.items()}
    headers["Server-Timing"] = ", ".join(f"{stage};dur={value:.3f}" for stage, value in timings.items())
    headers["X-Model-Version"] = engine.model_version
    return headers


async def run_search(svc: ServiceState, body: SearchRequest, started: float) -> Response:
    """`POST /search` after validation; `started` is the request's arrival (perf_counter)."""
    engine, batcher = svc.serving()
    prepared = await prepare(svc, engine, body.user_id, body.query, body.history, body.k, body.exclude_history)
    (result,) = await submit(svc, batcher, engine, [prepared])
    seconds = stage_seconds(prepared, result, started)
    svc.metrics.observe_stages(seconds)
    timings = _ms(seconds)
    return json_response(search_payload(engine, prepared, result, timings), headers=timing_headers(engine, timings))


def check_count(n: int, field: str, limit: int, setting: str = "max_batch_inputs") -> None:
    """A 422 naming `field` when a many-entry body is over its configured limit (`serve.<setting>`)."""
    if n > limit:
        raise ServiceError(ErrorType.VALIDATION_ERROR, f"{field} has {n} entries, over serve.{setting}={limit}", field)


async def run_search_batch(svc: ServiceState, body: BatchSearchRequest, started: float) -> Response:
    """`POST /search/batch`: every input searched as `/search` would, in one request."""
    engine, batcher = svc.serving()
    check_count(len(body.inputs), "inputs", svc.config.max_batch_inputs)
    inputs = [
        (f"inputs[{i}]", (r.user_id, r.query, r.history, r.k, r.exclude_history)) for i, r in enumerate(body.inputs)
    ]
    prepared = await prepare_many(svc, engine, inputs)
    results = await submit(svc, batcher, engine, prepared)
    payloads = []
    for p, result in zip(prepared, results, strict=True):
        seconds = stage_seconds(p, result, started)
        svc.metrics.observe_stages(seconds)
        payloads.append(search_payload(engine, p, result, _ms(seconds)))
    total = {"total": round((time.perf_counter() - started) * 1000, 4)}
    return json_response(
        {"results": payloads, "model_version": engine.model_version, "timings_ms": total},
        headers=timing_headers(engine, total),
    )


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A float32 vector as JSON numbers (exact: float32 -> float64 -> text round-trips) or OpenAI's base64."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(vector, dtype=np.float32).tolist()


def _item_rows(engine: Engine, item_ids: list[str]) -> list[int]:
    rows = []
    for j, item in enumerate(item_ids):
        row = engine.row_of.get(item)
        if row is None:
            raise ServiceError(
                ErrorType.UNKNOWN_ITEMS, f"item_ids[{j}]: {item!r} is not in the catalog", f"item_ids[{j}]"
            )
        rows.append(row)
    return rows


async def run_embed(svc: ServiceState, body: EmbedRequest, started: float) -> Response:
    """`POST /embed`: h_t per input (as `/search` computes it) and/or the index's item vectors."""
    engine, batcher = svc.serving()
    check_count(len(body.inputs), "inputs", svc.config.max_batch_inputs)
    if not body.inputs and not body.item_ids:
        raise ServiceError(ErrorType.VALIDATION_ERROR, "nothing to embed: give inputs, item_ids, or both", "inputs")
    rows = _item_rows(engine, body.item_ids)
    inputs = [(f"inputs[{i}]", (r.user_id, r.query, r.history, 0, False)) for i, r in enumerate(body.inputs)]
    prepared = await prepare_many(svc, engine, inputs)
    results = await submit(svc, batcher, engine, prepared) if prepared else []
    fmt = body.encoding_format
    vectors = engine.item_vectors(rows)
    payload = {
        "model_version": engine.model_version,
        "dim": engine.embed_dim,
        "embeddings": [encode_vector(r.embedding, fmt) for r in results],
        "inputs": [
            {
                "history_used": p.used,
                "history_truncated": p.truncated,
                "unknown_items": p.unknown,
                "query_truncated": r.query_truncated,
                "degraded": p.degraded is not None,
            }
            for p, r in zip(prepared, results, strict=True)
        ],
        "item_vectors": [encode_vector(v, fmt) for v in vectors],
        "timings_ms": {"total": round((time.perf_counter() - started) * 1000, 4)},
    }
    return json_response(payload, headers={"X-Model-Version": engine.model_version})


async def run_openai_embeddings(svc: ServiceState, body: OpenAIEmbeddingsRequest, started: float) -> Response:
    """`POST /v1/embeddings` in OpenAI's shape: each input string is a query, `user` a stored history."""
    engine, batcher = svc.serving()
    texts = [body.input] if isinstance(body.input, str) else body.input
    check_count(len(texts), "input", svc.config.max_batch_inputs)
    if body.dimensions is not None and body.dimensions != engine.embed_dim:
        raise ServiceError(
            ErrorType.UNSUPPORTED_DIMENSIONS,
            f"dimensions: this model's embeddings have {engine.embed_dim} dimensions, not {body.dimensions} "
            "(h_t cannot be shortened)",
            "dimensions",
        )
    many = not isinstance(body.input, str)
    for i, text in enumerate(texts):
        if not text.strip():
            where = f"input[{i}]" if many else "input"
            raise ServiceError(ErrorType.VALIDATION_ERROR, f"{where} is blank: every input is a query", where)
    inputs = [
        ("", (body.user, text, None, 0, False, f"input[{i}]" if many else "input")) for i, text in enumerate(texts)
    ]
    prepared = await prepare_many(svc, engine, inputs)
    results = await submit(svc, batcher, engine, prepared)
    headers = {"X-Model-Version": engine.model_version}
    degraded = next((p.degraded for p in prepared if p.degraded is not None), None)
    if degraded is not None:
        headers["X-Degraded"] = degraded.replace("\n", " ")
    tokens = sum(min(r.query_tokens, engine.max_query_tokens) for r in results)
    payload = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(r.embedding, body.encoding_format)}
            for i, r in enumerate(results)
        ],
        "model": engine.model_version,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return json_response(payload, headers=headers)
