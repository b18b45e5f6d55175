"""`POST /search` without FastAPI's per-request dispatch: ~0.1 ms less per search at low load.

Measured on the 2-core CPU machine (100k-item bundle, sequential requests): FastAPI's routing,
dependency solving and body handling took ~0.16 ms of a ~1.7 ms search; this path takes ~0.06 ms
(`benchmarks/bench_service_latency.py`). ServiceMiddleware, which has already buffered the body,
offers every `POST /search` here first. A request is answered here only when its body is a JSON
object that validates against the same `SearchRequest` model; then the same `run_search` as the
FastAPI route runs, and its ServiceErrors get the same typed responses and counters. Anything else
(another content type, malformed JSON, any validation error) is declined (None) and goes through
FastAPI unchanged, so every error keeps exactly the FastAPI route's answer.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import Scope

from service.errors import ServiceError, service_error_response
from service.schemas import SearchRequest
from service.searching import run_search

PATH = "/search"


def search_route(routes: list[Any]) -> Any:
    """The FastAPI route object for POST /search (for scope["route"]: metrics label it by its path)."""
    return next(r for r in routes if getattr(r, "path", None) == PATH and "POST" in getattr(r, "methods", ()))


class FastSearch:
    def __init__(self, route: Any) -> None:
        self.route = route  # the app's POST /search route (search_route), handed in: no import of the routes

    @staticmethod
    def applies(scope: Scope) -> bool:
        return scope["method"] == "POST" and scope["path"] == PATH

    async def __call__(self, scope: Scope, content_type: str | None, body: bytes) -> Response | None:
        if content_type is not None and content_type.partition(";")[0].strip().lower() != "application/json":
            return None  # FastAPI decides what a non-JSON body means
        try:
            request = SearchRequest.model_validate_json(body)
        except ValidationError:
            return None  # the FastAPI route re-parses it and answers with its usual typed 422
        scope["route"] = self.route
        app = scope["app"]
        try:
            return await run_search(app.state.svc, request, scope["state"]["t0"])
        except ServiceError as exc:
            return service_error_response(exc, app.state.metrics)
