"""The app factory: `create_app(settings)` -> a FastAPI app whose lifespan loads and serves one bundle.

    karma serve --bundle DIR                                  # the CLI (sets thread env vars first)
    KARMA_SERVE__BUNDLE=DIR uvicorn --factory service.app:from_env   # plain uvicorn

Start-up (lifespan): load and validate the bundle (checksums, shapes, graph I/O), open ONNX Runtime
sessions with explicit thread counts, warm the encoder with a probe and a full batch, connect
Redis (a Redis that is down does not stop the start: searches that carry a history still work),
start the micro-batching worker. Shutdown: refuse new requests (503), drain in-flight ones, stop the
worker thread, close Redis. Everything lives on `app.state.svc` (and `app.state.metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.responses import Response

from karma.config import KarmaConfig, ServeConfig, load_config
from karma.errors import KarmaError
from service.admin import router as admin_router
from service.errors import install_error_handlers
from service.fastpath import FastSearch, search_route
from service.items import router as items_router
from service.metrics import InFlight, Metrics
from service.middleware import Admission, ServiceMiddleware
from service.routes import router
from service.state import EngineFactory, ServiceState
from service.tracing import TracingMiddleware, build_tracing

log = logging.getLogger("karma.service")
DOCS_STATIC = "/docs/static"  # Swagger UI's JavaScript, CSS and icons

DESCRIPTION = """\
Personalized search over a KARMA export bundle: a query and/or a click history is encoded into one
next-interest embedding h_t by the ONNX query tower (micro-batched), and FAISS returns the top-k
items by inner product. Click histories live in Redis (`POST /events`).

Errors always have the body `{"error", "type", "field"}`: 422 for bad input, 413 for oversize
bodies, 429 (with Retry-After) when the encoder queue is full, 503 when not ready or when Redis is
needed and down. Stage timings are in the response and in `X-<Stage>-Time` headers (ms).

`POST /admin/reload` (bearer key `serve.admin_api_key`) swaps the served bundle without a restart.
"""


def serve_config(settings: ServeConfig | KarmaConfig) -> ServeConfig:
    return settings.serve if isinstance(settings, KarmaConfig) else settings


def create_app(
    settings: ServeConfig | KarmaConfig, engine_factory: EngineFactory | None = None, span_exporter: Any = None
) -> FastAPI:
    """`engine_factory` replaces `Engine.prepare` (the ONNX Runtime engine) for start-up and reloads;
    `bench.naive` uses it to serve the PyTorch query tower through this same app. `span_exporter`
    replaces the OTLP exporter when `serve.tracing` is on (tests pass an in-memory one)."""
    config = serve_config(settings)
    if config.bundle is None:
        raise KarmaError("no bundle to serve: set serve.bundle (karma serve --bundle DIR, or KARMA_SERVE__BUNDLE)")
    metrics = Metrics()
    in_flight = InFlight()
    svc = ServiceState(config, metrics, in_flight, engine_factory)
    svc.tracing = build_tracing(config, span_exporter)
    admission = Admission(config.max_concurrent_requests, config.max_waiting_requests, config.admission_wait_s)
    metrics.track_admission(lambda: admission.waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await svc.start()
            yield
        finally:
            await svc.stop()

    app = FastAPI(
        title="KARMA search",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # self-hosted below (FastAPI's default page loads Swagger UI from a CDN)
        redoc_url=None,
        openapi_url="/openapi.json" if config.docs else None,
    )
    app.state.svc = svc
    app.state.metrics = metrics
    install_error_handlers(app)
    # The routes go straight into the app's route list, first: include_router() would wrap them in
    # FastAPI's lazily resolved included-router layers, which cost ~17 µs per request (hot; measured).
    app.router.routes[:0] = [*router.routes, *admin_router.routes, *items_router.routes]
    app.openapi = _openapi_with_limits(app, config)  # type: ignore[method-assign]
    if config.docs:
        add_docs(app)
    app.add_middleware(
        ServiceMiddleware,
        metrics=metrics,
        in_flight=in_flight,
        max_body_bytes=config.max_body_bytes,
        access=config.access_log,
        fast=FastSearch(search_route(app.router.routes)),
        admission=admission,
        body_timeout_s=config.body_timeout_s,
        retry_after_s=config.retry_after_s,
        api_key=config.api_key,
    )
    tracing = svc.tracing
    if tracing is not None:
        app.add_middleware(TracingMiddleware, tracing=tracing)
    if config.cors_origins:  # outermost, so browser preflights are answered before the API key check
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "content-type", "x-api-key", "x-request-id"],
            expose_headers=["x-request-id", "x-model-version", "x-total-time", "server-timing"],
        )
    return app


def _openapi_with_limits(app: FastAPI, config: ServeConfig) -> Callable[[], dict[str, Any]]:
    """The generated schema plus the limits this app was configured with (query length, batch size),
    so a schema-valid request is never refused for a configured limit."""
    generate = app.openapi

    built_for: list[str | None] = [None]  # the model version the cached schema describes

    def openapi() -> dict[str, Any]:
        engine = app.state.svc.engine
        version = engine.model_version if engine is not None else None
        if app.openapi_schema is None or built_for[0] != version:  # POST /items depends on the served bundle
            app.openapi_schema = None
            schema = generate()
            models = schema["components"]["schemas"]
            for name in ("SearchRequest", "EmbedInput"):
                models[name]["properties"]["query"]["maxLength"] = config.max_query_chars
            for name in ("BatchSearchRequest", "EmbedRequest"):
                models[name]["properties"]["inputs"]["maxItems"] = config.max_batch_inputs
            models["ItemsRequest"]["properties"]["items"]["maxItems"] = config.max_upsert_items
            for variant in models["OpenAIEmbeddingsRequest"]["properties"]["input"]["anyOf"]:
                text = variant if variant.get("type") == "string" else variant["items"]
                text["maxLength"] = config.max_query_chars
                if variant.get("type") == "array":
                    variant["maxItems"] = config.max_batch_inputs
            if engine is not None:
                _item_body_schema(models, engine.manifest.item_text_fields, engine.visual_dim)
            app.openapi_schema = schema
            built_for[0] = version
        return app.openapi_schema

    return openapi


def _item_body_schema(models: dict[str, Any], fields: list[str], visual_dim: int | None) -> None:
    """`POST /items` as the served bundle takes it: its text fields by name, its visual block's width."""
    body = models["NewItemBody"]["properties"]
    string = body["text"]["anyOf"][0]
    body["text"]["anyOf"][1] = {
        "type": "object",
        "properties": {name: dict(string) for name in fields},
        "additionalProperties": False,
    }
    if visual_dim is None:
        body["visual"] = {"type": "null", "description": "This bundle has no visual feature block."}
    else:
        body["visual"]["anyOf"][0].update(minItems=visual_dim, maxItems=visual_dim)
    if fields:
        models["ItemsRequest"]["examples"] = [{"items": [{"item_id": "new-42", "text": {fields[0]: "Solar lantern"}}]}]


def add_docs(app: FastAPI) -> None:
    """/docs: Swagger UI served from the swagger-ui-bundle wheel's files (works offline, no CDN)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        log.warning("swagger-ui-bundle is not installed: no /docs page (/openapi.json is still served)")
        return
    from fastapi.openapi.docs import get_swagger_ui_html
    from starlette.staticfiles import StaticFiles

    app.mount(DOCS_STATIC, StaticFiles(directory=swagger_ui_path), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="KARMA search — API",
            swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC}/favicon-32x32.png",
        )


def from_env() -> FastAPI:
    """For `uvicorn --factory service.app:from_env`: config from KARMA_CONFIG / KARMA_SERVE__* variables."""
    return create_app(load_config())
