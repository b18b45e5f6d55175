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

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from karma.config import KarmaConfig, ServeConfig, load_config
from karma.errors import KarmaError
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import InFlight, ServiceMiddleware
from service.routes import router
from service.state import ServiceState

DESCRIPTION = """\
Personalized search over a KARMA export bundle: a query and/or a click history is encoded into one
next-interest embedding h_t by the ONNX query tower (micro-batched), and FAISS returns the top-k
items by inner product. Click histories live in Redis (`POST /events`).

Errors always have the body `{"error", "type", "field"}`: 422 for bad input, 413 for oversize
bodies, 429 (with Retry-After) when the encoder queue is full, 503 when not ready or when Redis is
needed and down. Stage timings are in the response and in `X-<Stage>-Time` headers (ms).
"""


def serve_config(settings: ServeConfig | KarmaConfig) -> ServeConfig:
    return settings.serve if isinstance(settings, KarmaConfig) else settings


def create_app(settings: ServeConfig | KarmaConfig) -> FastAPI:
    config = serve_config(settings)
    if config.bundle is None:
        raise KarmaError("no bundle to serve: set serve.bundle (karma serve --bundle DIR, or KARMA_SERVE__BUNDLE)")
    metrics = Metrics()
    in_flight = InFlight()
    svc = ServiceState(config, metrics, in_flight)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await svc.start()
            yield
        finally:
            await svc.stop()

    app = FastAPI(title="KARMA search", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.svc = svc
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(
        ServiceMiddleware,
        metrics=metrics,
        in_flight=in_flight,
        max_body_bytes=config.max_body_bytes,
        access=config.access_log,
    )
    return app


def from_env() -> FastAPI:
    """For `uvicorn --factory service.app:from_env`: config from KARMA_CONFIG / KARMA_SERVE__* variables."""
    return create_app(load_config())
