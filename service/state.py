"""What one running app holds (`app.state.svc`): config, engine, batcher, Redis store, metrics, lifecycle.

Hot reload (`reload`): the new bundle — a folder under serve.bundle_root — is loaded, validated,
probed and warmed in a daemon thread beside the serving one (the encoder keeps serving meanwhile),
within the load budget (`service.loadguard`: token budget, memory growth, time; shutdown stops it
too); only then is `self.engine` replaced,
in one step of the event loop. A request holds the engine it started with until it answers (its
item ids were resolved with it, and its job runs on it), so requests in flight finish on the old
bundle and every later request gets the new one. A bundle that fails any check is refused and the
old one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from karma.config import ServeConfig
from karma.errors import KarmaError
from service.batching import MicroBatcher
from service.engine import Engine, select_providers
from service.errors import ErrorType, ServiceError
from service.hcache import HCache
from service.history import HistoryStore, RedisUnavailable
from service.index import MilvusBackend, collection_name
from service.loadguard import LoadGuard, run_in_daemon_thread
from service.metrics import InFlight, Metrics
from service.registry import ItemRegistry
from service.schemas import MAX_K
from service.tracing import Tracing

log = logging.getLogger("karma.service")


# Builds the Engine for a bundle folder (blocking; runs in a worker thread; must return it probed and warmed).
EngineFactory = Callable[[Path], Engine]


def milvus_backend(config: ServeConfig) -> Callable[[Engine], MilvusBackend]:
    """For Engine.prepare: the Milvus collection of the engine's model, filled from its bundle if new."""

    def build(engine: Engine) -> MilvusBackend:
        uri = config.milvus_uri
        if "://" not in uri:  # Milvus Lite: a local file
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        backend = MilvusBackend(
            uri,
            collection_name(config.milvus_collection_prefix, engine.model_version),
            engine.embed_dim,
            config.milvus_index,
            config.milvus_token,
            config.milvus_timeout_s,
        )
        backend.ensure(engine.bundle.item_embeddings)  # the bundle's own array: no copy of every vector
        return backend

    return build


class ServiceState:
    def __init__(
        self, config: ServeConfig, metrics: Metrics, in_flight: InFlight, engine_factory: EngineFactory | None = None
    ):
        self.config = config
        self.engine_factory = engine_factory  # None: Engine.prepare (ONNX Runtime); benchmarks plug in others
        self.metrics = metrics
        self.in_flight = in_flight
        self.engine: Engine | None = None
        self.batcher: MicroBatcher | None = None
        self.tracing: Tracing | None = None  # service.tracing, when serve.tracing is on
        self.history: HistoryStore = HistoryStore(
            config.redis_url,
            config.redis_key_prefix,
            config.redis_timeout_s,
            metrics.redis_errors,
            config.redis_health_check_s,
            config.event_id_ttl_s,
        )
        self.registry = ItemRegistry(self.history)  # live items of a shared index (Milvus), in Redis
        self.providers: list[str] = []
        self.bundle_path: Path | None = config.bundle
        self.loaded_at: float | None = None
        self.last_reload: dict[str, Any] | None = None
        self._reloading = False
        self._load_guard: LoadGuard | None = None  # the load in progress (shutdown stops it)
        self.ready = False
        self.draining = False
        self.started_at: float | None = None
        self.startup_seconds: float | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load and validate the bundle, open sessions, warm up, connect Redis, start the batcher."""
        began = time.perf_counter()
        config = self.config
        assert config.bundle is not None
        self.providers = select_providers(config.providers)
        engine = await run_in_daemon_thread(lambda: self._prepare(config.bundle), "karma-load")
        self._install(engine, config.bundle)
        self.batcher = MicroBatcher(
            config.max_batch_size,
            config.max_batch_wait_ms / 1000.0,
            config.queue_size,
            on_batch=self.metrics.batch_size.observe,
            max_batch_tokens=config.max_batch_tokens,
        )
        batcher = self.batcher
        self.metrics.track_queue(lambda: batcher.depth)
        try:
            await self.history.ping()
        except RedisUnavailable as exc:
            log.warning(
                "Redis at %s is unavailable at start (%s); serving searches that carry history",
                self.history.describe(),
                exc,
            )
        await self._follow_registry(engine, self.batcher)
        self.batcher.start()
        self.ready = True
        self.started_at = time.time()
        self.startup_seconds = time.perf_counter() - began
        log.info(
            "serving bundle %s (model %s, %d items, %s, index on %s) ready in %.2f s",
            config.bundle,
            engine.model_version,
            engine.n_items,
            engine.sessions.providers[0],
            engine.index_device,
            self.startup_seconds,
        )

    async def _follow_registry(self, engine: Engine, batcher: MicroBatcher) -> None:
        """Shared index: apply the live items recorded so far (before serving), then follow new changes."""
        self.registry.restart()
        if not engine.index.shared:
            return
        try:
            applied = await self.registry.catch_up(engine, batcher)
            log.info("live item registry: %d change(s) replayed for model %s", applied, engine.model_version)
        except RedisUnavailable as exc:
            log.warning("live item registry unavailable at load (%s): following it when Redis is back", exc)
        self.registry.follow(engine, batcher)

    def _prepare(self, directory: Path) -> Engine:
        """Load + validate + probe + warm within the load budget (blocking: run it in a daemon thread)."""
        if self.engine_factory is not None:
            return self.engine_factory(directory)
        config = self.config
        with LoadGuard(config.load_memory_budget_mb, config.load_timeout_s) as guard:
            self._load_guard = guard
            try:
                engine = Engine.prepare(
                    directory,
                    self.providers,
                    config.intra_op_threads,
                    config.max_batch_size,
                    config.faiss_device,
                    config.rerank_factor,
                    config.max_batch_tokens,
                    guard,
                    milvus_backend(config) if config.index_backend == "milvus" else None,
                )
            finally:
                self._load_guard = None
        log.info("bundle %s loaded; the load grew RSS by %.0f MiB at peak", directory.name, guard.peak_growth_mb)
        return engine

    def _install(self, engine: Engine, directory: Path) -> None:
        """Make `engine` the one new requests get (no await inside: atomic for the event loop)."""
        if self.config.h_cache_entries > 0:  # a new engine, a new (empty) cache: the model changed
            counter = self.metrics.h_cache
            engine.h_cache = HCache(
                self.config.h_cache_entries, lambda hit: counter.labels("hit" if hit else "miss").inc()
            )
        self.engine = engine
        self.bundle_path = directory
        if engine.max_history > self.config.history_max_events:
            log.warning(
                "bundle reads up to %d history items but serve.history_max_events keeps %d per user",
                engine.max_history,
                self.config.history_max_events,
            )
        self.loaded_at = time.time()
        self.metrics.set_model(
            engine.model_version,
            engine.manifest.dims.embed_dim,
            engine.parameters,
            engine.flops_per_request,
            engine.sessions.providers[0],
            engine.manifest.index.type,
        )

    async def reload(self, directory: Path | None) -> dict[str, Any]:
        """Load `directory` (default: the served folder again) beside the serving bundle, then swap.

        Raises ServiceError: 409 while another reload runs, 422 `invalid_bundle` (naming the problem)
        when the bundle fails any check; the old bundle keeps serving in both cases.
        """
        old, _ = self.serving()
        if self._reloading:
            raise ServiceError(
                ErrorType.RELOAD_IN_PROGRESS, "another reload is in progress; retry when it has finished"
            )
        target = self.bundle_path if directory is None else self.resolve_bundle(directory)
        assert target is not None
        self._reloading = True
        began = time.perf_counter()
        outcome = "failed"
        try:
            engine = await run_in_daemon_thread(lambda: self._prepare(target), "karma-reload")
            old, batcher = self.serving()  # not while draining; and the engine serving now is the one replaced
            await self._follow_registry(engine, batcher)  # a shared index: its live items before it serves
            self._install(engine, target)
            outcome = "success"
        except KarmaError as exc:
            outcome = "rejected"
            if self.draining:
                why = self._without_root(str(exc), target)
                raise ServiceError(
                    ErrorType.NOT_READY, f"reload stopped: the service is shutting down ({why})"
                ) from None
            raise ServiceError(
                ErrorType.INVALID_BUNDLE,
                f"reload refused, still serving {old.model_version}: {self._without_root(str(exc), target)}",
                "bundle",
                extra={"model_version": old.model_version},
            ) from None
        finally:
            seconds = time.perf_counter() - began
            self._reloading = False
            self.metrics.reloads.labels(outcome=outcome).inc()
            self.metrics.reload_duration.observe(seconds)
            self.last_reload = {"at": time.time(), "outcome": outcome, "bundle": self.shown(target), "seconds": seconds}
        log.info(
            "reloaded: now serving %s (model %s, was %s) after %.2f s",
            target,
            engine.model_version,
            old.model_version,
            seconds,
        )
        return {
            "model_version": engine.model_version,
            "previous_model_version": old.model_version,
            "bundle": self.shown(target),
            "n_items": engine.n_items,
            "embed_dim": engine.manifest.dims.embed_dim,
            "seconds": round(seconds, 4),
        }

    @property
    def bundle_root(self) -> Path:
        root = self.config.bundle_root
        if root is None:
            assert self.config.bundle is not None
            served = Path(self.config.bundle).resolve()
            root = served.parent if served.parent != served.parent.parent else served  # never "/" by default
        return root.resolve()

    def resolve_bundle(self, directory: Path) -> Path:
        """The reload target under serve.bundle_root, or a 422 that says nothing about the server's files."""
        root = self.bundle_root
        resolved = (root / directory).resolve()  # an absolute `directory` replaces the root
        if not resolved.is_relative_to(root):
            raise ServiceError(
                ErrorType.INVALID_BUNDLE,
                "reload refused: a bundle must be a folder under the bundle root (serve.bundle_root); "
                "give its path relative to that root",
                "bundle",
            )
        return resolved

    def shown(self, directory: Path) -> str:
        """How answers name a bundle: relative to the bundle root (no server paths)."""
        try:
            return str(directory.resolve().relative_to(self.bundle_root))
        except ValueError:
            return directory.name

    def _without_root(self, message: str, target: Path) -> str:
        return message.replace(str(target), self.shown(target))

    async def stop(self) -> None:
        """Refuse new requests, let in-flight ones finish (up to drain_timeout_s), then stop."""
        self.draining = True
        guard = self._load_guard
        if guard is not None:  # a reload in progress must not keep the process alive
            guard.stop("the service is shutting down")
        deadline = time.perf_counter() + self.config.drain_timeout_s
        while self.in_flight.count > 0 and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        if self.in_flight.count:
            log.warning("stopping with %d request(s) still in flight", self.in_flight.count)
        await self.registry.close()
        if self.engine is not None:
            self.engine.close()
        if self.batcher is not None:
            await self.batcher.stop(max(0.0, deadline - time.perf_counter()))
        await self.history.close()
        if self.tracing is not None:
            self.tracing.shutdown()  # flushes the spans still queued for the exporter
        self.ready = False
        log.info("stopped")

    # ---- per request ----------------------------------------------------------------------------

    def serving(self) -> tuple[Engine, MicroBatcher]:
        if self.draining:
            raise ServiceError(
                ErrorType.NOT_READY,
                "the service is shutting down",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
        if not self.ready or self.engine is None or self.batcher is None:
            raise ServiceError(
                ErrorType.NOT_READY, "the service is starting", headers={"Retry-After": str(self.config.retry_after_s)}
            )
        return self.engine, self.batcher

    async def readiness(self) -> tuple[dict[str, Any], list[str]]:
        checks: dict[str, Any] = {}
        reasons: list[str] = []
        if self.draining:
            reasons.append("draining (shutting down)")
        engine, batcher = self.engine, self.batcher
        if engine is None or batcher is None or not self.ready:
            checks["bundle"] = {"ok": False}
            reasons.append("bundle not loaded yet")
        else:
            checks["bundle"] = {"ok": True, "model_version": engine.model_version, "n_items": engine.n_items}
            try:
                checks["encoder"] = {"ok": True, **await batcher.run_in_worker(engine.probe)}
            except Exception as exc:  # any failure of the probe means "not ready", with the reason
                log.exception("readiness probe failed")
                checks["encoder"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                reasons.append(f"probe inference failed: {exc}")
            try:
                held = await batcher.run_in_worker(engine.index.count)
                # what this replica knows it serves: the bundle's items and the live ones, less the deleted
                expected = engine.catalog.size - len(engine.catalog.deleted)
                checks["index"] = {"ok": held >= expected, "backend": engine.index.name, "n_items": held}
                if held < expected:
                    reasons.append(f"the {engine.index.name} index holds {held} of the {expected} items served")
            except Exception as exc:  # e.g. Milvus unreachable
                checks["index"] = {"ok": False, "backend": engine.index.name, "error": f"{type(exc).__name__}: {exc}"}
                reasons.append(f"{engine.index.name} index unavailable: {exc}")
        try:
            began = time.perf_counter()
            await self.history.ping()
            checks["redis"] = {"ok": True, "ms": round((time.perf_counter() - began) * 1000, 3)}
        except RedisUnavailable as exc:
            checks["redis"] = {"ok": False, "error": str(exc), "required": self.config.ready_requires_redis}
            if self.config.ready_requires_redis:
                reasons.append(f"redis unavailable ({exc})")
        return checks, reasons

    def info(self) -> dict[str, Any]:
        config = self.config
        out: dict[str, Any] = {
            "ready": self.ready and not self.draining,
            "bundle": self.bundle_path.name if self.bundle_path is not None else None,  # no server paths
            "loaded_at": self.loaded_at,
            "last_reload": self.last_reload,
            "admin_enabled": config.admin_api_key is not None,
            "providers": self.providers,
            "faiss_device": config.faiss_device,
            "intra_op_threads": config.intra_op_threads,
            "batching": {
                "max_batch_size": config.max_batch_size,
                "max_batch_wait_ms": config.max_batch_wait_ms,
                "queue_size": config.queue_size,
                "max_batch_tokens": config.max_batch_tokens,
            },
            "admission": {
                "max_concurrent_requests": config.max_concurrent_requests,
                "max_waiting_requests": config.max_waiting_requests,
                "admission_wait_s": config.admission_wait_s,
                "body_timeout_s": config.body_timeout_s,
                "header_timeout_s": config.header_timeout_s,
            },
            "load_budget": {"memory_mb": config.load_memory_budget_mb, "timeout_s": config.load_timeout_s},
            "limits": {
                "k": [1, MAX_K],
                "max_batch_inputs": config.max_batch_inputs,
                "max_body_bytes": config.max_body_bytes,
                "max_query_chars": config.max_query_chars,
            },
            "redis": {"url": self.history.describe(), "key_prefix": config.redis_key_prefix},
            "startup_seconds": self.startup_seconds,
        }
        engine = self.engine
        if engine is not None:
            m = engine.manifest
            out.update(
                {
                    "model_version": m.model_version,
                    "created_at": m.created_at,
                    "dims": m.dims.model_dump(),
                    "max_query_tokens": m.max_query_tokens,
                    "max_history": m.max_history,
                    "n_items": m.n_items,
                    "index": {
                        "type": m.index.type,
                        "faiss_class": m.index.faiss_class,
                        "metric": m.index.metric,
                        "params": m.index.params,
                        "ntotal": int(engine.bundle.index.ntotal),
                        "device": engine.index_device,
                        "rerank_factor": engine.rerank_factor,
                    },
                    "index_backend": engine.index.describe(),
                    "parameters": {**m.served_parameters, "served": engine.parameters},
                    "flops_per_request": engine.flops_per_request,
                    "session_providers": engine.sessions.providers,
                    "onnx": {"exporter": m.onnx.exporter, "opset": m.onnx.opset},
                    "training": {"preset": m.training.preset, "backbone": m.training.backbone, "step": m.training.step},
                    "feature_layout": m.feature_layout,
                    "items": {
                        "accepts_upserts": engine.accepts_items,
                        "text_fields": m.item_text_fields,
                        "text_encoder": None if m.text_encoder is None else m.text_encoder.kind,
                        "visual_dim": engine.visual_dim,
                        "max_upsert_items": config.max_upsert_items,
                        **engine.catalog.describe(),
                    },
                    "h_cache": engine.h_cache.describe() if engine.h_cache is not None else None,
                }
            )
        return out
