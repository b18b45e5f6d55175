"""The compute core: a loaded bundle turned into "item ids -> rows" and "batch of jobs -> top-k".

`Engine.run_batch` is what the micro-batching worker calls in its single executor thread: it
tokenises all queries of the batch, builds the history tensors with the shared featurizer
(`karma.featurize`, the layout training used), runs the ONNX query encoder once and FAISS once for
the whole batch, then applies each request's exclusions and k. Nothing here touches the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from karma.bundle import Bundle, EncoderSessions, load_bundle, open_text_encoder, read_manifest
from karma.contracts import FeatureBlock
from karma.errors import KarmaError
from karma.featurize import query_encoder_feeds
from karma.hashed_id import hashed_id_buckets
from karma.text_features import item_texts
from service.catalog import LiveCatalog
from service.hcache import HCache
from service.index import FaissBackend, IndexBackend
from service.loadguard import LoadGuard, LoadStopped

log = logging.getLogger("karma.service")

_EMPTY = np.zeros(0, dtype=np.int64)
_NO_SCORES = np.zeros(0, dtype=np.float32)


@dataclass
class Job:
    """One /search request as the encoder sees it (item ids already resolved to rows)."""

    query: str
    history: np.ndarray  # int64 rows, oldest first, at most max_history
    k: int  # 0: embed only (POST /embed): h_t comes back, the index is not searched
    exclude: np.ndarray  # int64 unique rows to leave out of the results
    enqueued: float = 0.0  # perf_counter at submit


class BadItems(KarmaError):
    """Items the bundle cannot index (a 422): `field` names the request field at fault."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass
class NewItem:
    """One item of a POST /items body, validated."""

    item_id: str
    text: dict[str, str]  # catalog text field -> value (the bundle's item_text_fields)
    title: str | None = None
    visual: list[float] | None = None


@dataclass
class JobResult:
    rows: np.ndarray  # int64 item rows, best first
    scores: np.ndarray  # float32
    batch_size: int
    seconds: dict[str, float] = field(default_factory=dict)  # queue, featurize, encode, search
    query_truncated: bool = False  # the query had more than max_query_tokens tokens (the rest was not read)
    embedding: np.ndarray | None = None  # h_t (float32, embed_dim, unit length) the index was searched with
    query_tokens: int = 0  # the query's token count before truncation


def request_tokens(history: int, max_query_tokens: int) -> int:
    """Encoder positions of one request: history items + query tokens + the [EMB] slot."""
    return history + max_query_tokens + 1


def select_providers(choice: str) -> list[str]:
    """'auto' -> CUDA when this onnxruntime build has it, else CPU; 'cuda' insists on CUDA."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if choice == "cuda":
        raise KarmaError(f"serve.providers=cuda, but this onnxruntime offers only {available}")
    return ["CPUExecutionProvider"]


GPU_INDEX_TYPES = ("flat", "ivfpq")  # FAISS has GPU versions of these; HNSW is CPU-only
APPROXIMATE_INDEX_TYPES = ("hnsw", "ivfpq")  # re-ranked with exact embeddings (serve.rerank_factor)


def select_faiss_device(choice: str, index_type: str) -> str:
    """'cpu' or 'cuda' for a bundle's index: auto = GPU when FAISS sees one and can hold this index type."""
    if choice == "cpu":
        return "cpu"
    from karma.bundle import import_faiss

    faiss = import_faiss()
    gpus = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    if gpus > 0 and hasattr(faiss, "StandardGpuResources") and index_type in GPU_INDEX_TYPES:
        return "cuda"
    if choice == "cuda":
        why = (
            f"FAISS has no GPU version of a {index_type} index (serve it on the CPU, or export with --index flat/ivfpq)"
            if gpus > 0
            else "this FAISS build sees no GPU (install the gpu extra: faiss-gpu-cu12)"
        )
        raise KarmaError(f"serve.faiss_device=cuda, but {why}")
    return "cpu"


def index_to_gpu(index: Any) -> tuple[Any, Any]:
    """(GPU copy of `index` on device 0, its GPU resources object, which must outlive it)."""
    from karma.bundle import import_faiss

    faiss = import_faiss()
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, 0, index), resources


class Engine:
    """A validated bundle with open ONNX Runtime sessions and its FAISS index."""

    def __init__(self, bundle: Bundle, sessions: EncoderSessions):
        if bundle.index is None:
            raise KarmaError(f"bundle {bundle.directory}: loaded without its FAISS index")
        self.bundle = bundle
        self.sessions = sessions
        self.manifest = bundle.manifest
        self.max_history = bundle.manifest.max_history
        self.max_query_tokens = bundle.manifest.max_query_tokens
        self.n_items = bundle.manifest.n_items
        titles: list[str | None] | None = None
        if "title" in bundle.items.columns:
            titles = [None if t is None else str(t) for t in bundle.items["title"].tolist()]
        self._embeddings = np.ascontiguousarray(bundle.item_embeddings, dtype=np.float32)
        # every served item, the bundle's and those added live (POST /items); rows never move
        self.catalog = LiveCatalog(
            [str(i) for i in bundle.items["item_id"].tolist()],
            titles,
            bundle.item_features,
            bundle.item_id_buckets,
            self._embeddings,
        )
        self.item_ids: list[str] = self.catalog.item_ids  # the same objects: appended to by live upserts
        self.row_of: dict[str, int] = self.catalog.row_of
        self.titles = self.catalog.titles
        self._needs_buckets = bundle.query_takes_buckets
        self._text_encoder: Any = None  # opened on the first POST /items (ORT session of ~90 MB for MiniLM)
        self._text_encoder_lock = threading.Lock()
        self._items_thread: ThreadPoolExecutor | None = None  # featurises POST /items bodies, one at a time
        self.index_device = "cpu"  # "cuda" once `load` has moved the index to the GPU
        self.rerank_factor = 1  # `load` sets serve.rerank_factor for approximate indexes
        self.index: IndexBackend = FaissBackend(bundle.index, self._embeddings)  # `load`/`prepare` may replace it
        self.h_cache: HCache | None = None  # serve.h_cache_entries > 0: set by the service once the engine is ready
        self.run_options: Any = None  # an ort.RunOptions while a LoadGuard watches the probe and warm-up
        self._gpu_resources: Any = None
        if self._needs_buckets and self.catalog.id_rows is None:
            raise KarmaError(f"bundle {bundle.directory}: the query encoder needs hist_buckets but there are none")

    @classmethod
    def load(
        cls,
        directory: Path | str,
        providers: list[str],
        intra_op_threads: int,
        faiss_device: str = "cpu",
        rerank_factor: int = 1,
    ) -> Engine:
        bundle = load_bundle(directory, check_graphs=False)  # open_sessions checks the graphs' I/O
        sessions = bundle.open_sessions(providers, intra_op_threads=intra_op_threads, inter_op_threads=1)
        engine = cls(bundle, sessions)
        engine.rerank_factor = rerank_factor if bundle.manifest.index.type in APPROXIMATE_INDEX_TYPES else 1
        engine.index_device = select_faiss_device(faiss_device, bundle.manifest.index.type)
        if engine.index_device == "cuda":
            bundle.index, engine._gpu_resources = index_to_gpu(bundle.index)
        engine.index = FaissBackend(bundle.index, engine._embeddings, engine.rerank_factor, bundle.manifest.index.type)
        return engine

    @classmethod
    def prepare(
        cls,
        directory: Path | str,
        providers: list[str],
        intra_op_threads: int,
        warm_batch: int,
        faiss_device: str = "cpu",
        rerank_factor: int = 1,
        max_batch_tokens: int | None = None,
        guard: LoadGuard | None = None,
        index_backend: Callable[[Engine], IndexBackend] | None = None,
    ) -> Engine:
        """Load, validate, probe and warm a bundle, ready to serve (start-up and hot reload; blocking).

        Any failure is one `KarmaError` naming the bundle and the problem: the loader's own checks,
        a request longer than `max_batch_tokens` (checked on the manifest, before anything big is
        read), a `guard` stop (memory/time budget, shutdown), and anything else a broken bundle can
        raise (an unreadable parquet, an ONNX Runtime error in the probe), logged with its trace first.
        The warm-up batch is `warm_batch` requests of full length, fewer where the token budget says so.
        """
        stage = "load"
        try:
            if max_batch_tokens is not None:
                manifest = read_manifest(Path(directory))
                tokens = request_tokens(manifest.max_history, manifest.max_query_tokens)
                if tokens > max_batch_tokens:
                    raise KarmaError(
                        f"bundle {directory}: one request is max_history {manifest.max_history} + max_query_tokens "
                        f"{manifest.max_query_tokens} + 1 = {tokens} tokens, over serve.max_batch_tokens="
                        f"{max_batch_tokens} (raise the budget, or export with a shorter data.max_history)"
                    )
                warm_batch = max(1, min(warm_batch, max_batch_tokens // tokens))
            engine = cls.load(directory, providers, intra_op_threads, faiss_device, rerank_factor)
            if index_backend is not None:  # e.g. Milvus instead of the bundle's FAISS index (serve.index_backend)
                stage = "index backend"
                engine.index = index_backend(engine)
            if guard is not None:
                guard.check()
                engine.run_options = guard.run_options
            stage = "probe inference"
            engine.probe()
            stage = "warm-up batch"
            engine.warm(warm_batch)
            if guard is not None:
                guard.check()
            engine.run_options = None
        except KarmaError as exc:
            if stage == "load" and not isinstance(exc, LoadStopped):
                raise
            raise KarmaError(f"bundle {directory}: {stage} failed: {exc}") from None
        except Exception as exc:  # the bundle's fault as far as the caller can tell; keep the trace in the log
            if guard is not None and guard.reason is not None:  # ORT's "Exiting due to terminate flag"
                raise KarmaError(f"bundle {directory}: {stage} stopped: {guard.reason}") from None
            log.exception("bundle %s: %s failed", directory, stage)
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise KarmaError(f"bundle {directory}: {stage} failed: {type(exc).__name__}: {detail}") from None
        return engine

    def resolve(self, item_ids: list[str]) -> tuple[list[int], list[str]]:
        """(rows of the known ids, in order; the unknown ids, first occurrence each, in order)."""
        row_of = self.row_of
        rows: list[int] = []
        unknown: dict[str, None] = {}
        for item in item_ids:
            row = row_of.get(item)
            if row is None:
                unknown[item] = None
            else:
                rows.append(row)
        return rows, list(unknown)

    def make_job(self, query: str, rows: list[int], k: int, exclude_history: bool) -> Job:
        """The Job for a query and known history rows (oldest first): the newest max_history are read,
        and with `exclude_history` every history row (also the older ones) is left out of the results."""
        history = np.asarray(rows, dtype=np.int64)
        exclude = np.unique(history) if exclude_history and len(history) else _EMPTY
        return Job(query=query, history=history[max(0, len(history) - self.max_history) :], k=k, exclude=exclude)

    def request_tokens(self, job: Job) -> int:
        """What `job` adds to a batch's token budget: its history (as the model reads it) + the query."""
        return request_tokens(max(1, min(len(job.history), self.max_history)), self.max_query_tokens)  # L >= 1

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    @property
    def embed_dim(self) -> int:
        return int(self.manifest.dims.embed_dim)

    def item_vectors(self, rows: list[int]) -> np.ndarray:
        """The item embeddings at `rows` (float32, len x embed_dim), exactly as the index holds them."""
        return self.catalog.embeddings[np.asarray(rows, dtype=np.int64)]

    @property
    def parameters(self) -> int:
        served = self.manifest.served_parameters
        return int(served.get("query_tower", 0) + served.get("item_tower", 0))

    @property
    def flops_per_request(self) -> int | None:
        cost = getattr(self.manifest, "cost", None)
        if isinstance(cost, dict) and "query_flops" in cost:
            return int(cost["query_flops"])
        return None

    # ---- items added live (POST /items, DELETE /items; executor thread) ----------------------------

    @property
    def accepts_items(self) -> bool:
        """Whether this bundle ships its item text encoder (exported without --no-text-encoder)."""
        return self.manifest.text_encoder is not None

    @property
    def visual_block(self) -> FeatureBlock | None:
        """The one non-text feature block a new item's `visual` vector fills (None: there is none, or several)."""
        text = self.manifest.text_encoder
        others = [b for b in self.manifest.layout.blocks if text is None or b.name != text.block]
        return others[0] if len(others) == 1 else None

    @property
    def visual_dim(self) -> int | None:
        block = self.visual_block
        return None if block is None else block.dim

    async def featurise_items(self, items: list[NewItem]) -> tuple[np.ndarray, np.ndarray | None]:
        """`item_inputs` on this engine's item thread: text encoding (MiniLM: ms per item) never holds up the
        encode thread's searches, and concurrent upserts take turns instead of oversubscribing the cores."""
        if self._items_thread is None:
            self._items_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="karma-items")
        return await asyncio.get_running_loop().run_in_executor(self._items_thread, self.item_inputs, items)

    def item_inputs(self, items: list[NewItem]) -> tuple[np.ndarray, np.ndarray | None]:
        """The item encoder's inputs for new items, built the way export built the catalog's (any thread).

        Text block: the bundle's own text encoder over the fields joined as training joined them; visual
        block: the item's vector, or zeros (what training gave items without an image); ID row: the cold
        path: an item outside the bundle gets the "no ID" row 0 (exact IDs) and is scored from content
        alone, a bundle item keeps its trained row; hashed IDs hash the id as training did.
        """
        info = self.manifest.text_encoder
        if info is None:
            raise KarmaError("this bundle ships no item text encoder (exported with --no-text-encoder)")
        with self._text_encoder_lock:  # the first call opens it (ORT sessions then run from any thread)
            if self._text_encoder is None:
                self._text_encoder = open_text_encoder(self.bundle.directory, info)
        layout = self.manifest.layout
        fields = self.manifest.item_text_fields
        text = self._text_encoder.encode(item_texts(fields, [item.text for item in items]))
        features = np.zeros((len(items), layout.dim), dtype=np.float32)
        features[:, layout.slice_of(info.block)] = text
        visual = self.visual_block
        for i, item in enumerate(items):
            if item.visual is not None and visual is not None:
                features[i, layout.slice_of(visual.name)] = item.visual
        if layout.id_buckets == 0:
            return features, None
        if layout.id_scheme == "exact":
            known = [self.row_of.get(item.item_id) for item in items]
            base = self.bundle.item_id_buckets
            assert base is not None
            id_rows = np.asarray([base[r] if r is not None and r < self.n_items else 0 for r in known], np.int64)
        else:
            id_rows = hashed_id_buckets([item.item_id for item in items], layout.id_buckets, layout.id_hash_seed)
        return features, id_rows

    def upsert_items(
        self,
        items: list[NewItem],
        rows: list[int] | None = None,
        inputs: tuple[np.ndarray, np.ndarray | None] | None = None,
    ) -> list[tuple[int, bool]]:
        """Encode and index `items` (encode thread); (row, created) per item. `rows`: given by a shared registry,
        else an id already served keeps its row and a new id gets the next one. `inputs`: `item_inputs(items)`,
        computed beforehand off the encode thread (text encoding is the slow part; searches must not wait on it)."""
        features, id_rows = inputs if inputs is not None else self.item_inputs(items)
        vectors = self.sessions.encode_items(features, id_rows)
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if len(bad):  # e.g. visual values too large for the tower: never index a vector no search can rank
            raise BadItems(
                f"item {items[bad[0]].item_id!r}: the item encoder gives a non-finite vector for it "
                "(visual values far outside what training saw?)",
                "items",
            )
        created = [item.item_id not in self.row_of for item in items]
        if rows is None:
            fresh: dict[str, int] = {}
            rows = []
            for item in items:
                row = self.row_of.get(item.item_id)
                if row is None:
                    row = fresh.setdefault(item.item_id, self.catalog.size + len(fresh))
                rows.append(row)
        self.index.upsert(rows, vectors)
        self.apply_items(rows, items, features, id_rows, vectors)
        return list(zip(rows, created, strict=True))

    def close(self) -> None:
        """Stop this engine's item thread (the service is stopping; a reloaded-away engine keeps it until then)."""
        if self._items_thread is not None:
            self._items_thread.shutdown(wait=False, cancel_futures=True)

    def apply_items(self, rows: list[int], items: list[NewItem], features: np.ndarray, id_rows: np.ndarray | None,
                    vectors: np.ndarray) -> None:  # fmt: skip
        """Record items the index already holds (this engine's upsert, or another replica's): catalog + h_t cache."""
        self.catalog.put(rows, [i.item_id for i in items], [i.title for i in items], features, id_rows, vectors)
        if self.h_cache is not None:  # a replaced item's features change h_t of every history holding it
            self.h_cache.clear()

    def delete_item(self, item_id: str) -> int | None:
        """Remove an item from the index (its row and features stay, for histories); its row, None if unknown."""
        row = self.row_of.get(item_id)
        if row is None or row in self.catalog.deleted:
            return None
        self.index.delete([row])
        self.catalog.delete(row)
        return row

    # ---- the batch path (executor thread) -------------------------------------------------------

    def feeds(
        self, queries: list[str], histories: list[np.ndarray], query_lengths: list[int] | None = None
    ) -> dict[str, np.ndarray]:
        """The query encoder's inputs for a batch, built exactly as training builds them."""
        return query_encoder_feeds(
            self.bundle.tokenizer,
            self.catalog.features,  # type: ignore[arg-type]  # a RowStore gathers rows like an array
            queries,
            histories,
            self.max_query_tokens,
            self.max_history,
            self.catalog.id_rows if self._needs_buckets else None,  # type: ignore[arg-type]
            query_lengths,
        )

    def run_batch(self, jobs: list[Job]) -> list[JobResult]:
        started = time.perf_counter()
        query_lengths = [0] * len(jobs)
        cache = self.h_cache
        misses = list(range(len(jobs)))
        h = np.empty((len(jobs), self.embed_dim), dtype=np.float32)
        if cache is not None:  # hot users without a new click: their h_t as the encoder gave it last time
            misses = []
            for i, job in enumerate(jobs):
                hit = cache.get(job.query, job.history)
                if hit is None:
                    misses.append(i)
                else:
                    h[i], query_lengths[i] = hit
        lengths: list[int] = []
        if misses:
            feeds = self.feeds([jobs[i].query for i in misses], [jobs[i].history for i in misses], lengths)
        featurized = time.perf_counter()
        if misses:
            h[misses] = self.sessions.encode_query(feeds, self.run_options)
            for at, i in enumerate(misses):
                query_lengths[i] = lengths[at]
                if cache is not None:
                    cache.put(jobs[i].query, jobs[i].history, h[i], lengths[at])
        encoded = time.perf_counter()
        results: list[JobResult] = [None] * len(jobs)  # type: ignore[list-item]  # each job is in one group
        for i, job in enumerate(jobs):
            if job.k == 0:  # embed only
                cut = query_lengths[i] > self.max_query_tokens
                results[i] = JobResult(_EMPTY, _NO_SCORES, len(jobs), query_truncated=cut)
        for members, k_search in self.search_groups(jobs):
            scores, rows = self.index.search(h[members], k_search)
            for at, i in enumerate(members):
                job = jobs[i]
                # FAISS pads with -1 when it finds fewer than asked; a shared index (Milvus) may hold rows this
                # replica has not heard of yet (another replica's upsert, a moment ago): neither is an answer
                keep = (rows[at] >= 0) & (rows[at] < self.catalog.size)
                deleted = self.catalog.deleted_rows  # deleted items, and rows not heard of yet (a shared index)
                if len(deleted):
                    keep &= ~np.isin(rows[at], deleted)
                if len(job.exclude):
                    keep &= ~np.isin(rows[at], job.exclude)
                kept = np.flatnonzero(keep)[: job.k]
                cut = query_lengths[i] > self.max_query_tokens
                results[i] = JobResult(rows[at][kept], scores[at][kept], len(jobs), query_truncated=cut)
        searched = time.perf_counter()
        shared = {
            "featurize": featurized - started,
            "encode": encoded - featurized,
            "search": searched - encoded,
        }
        for i, (job, result) in enumerate(zip(jobs, results, strict=True)):
            result.seconds = {"queue": max(0.0, started - job.enqueued), **shared}
            result.embedding = h[i]
            result.query_tokens = query_lengths[i]
        return results

    def search_groups(self, jobs: list[Job]) -> list[tuple[np.ndarray, int]]:
        """(job positions, k to ask the index for): one index search per group of similar k.

        A batch shares one encoder run, but a search with k = 1000 costs far more than one with k = 10
        (the index keeps a k-sized heap per query), so asking for the batch's largest k made four
        heavy clients cut 28 light ones' throughput by 71%. Jobs are grouped by the power of 4 of
        their k (+ exclusions): a heavy request pays for its own k, light neighbours for theirs.
        Embed-only jobs (k = 0) are in no group.
        """
        wanted = [min(self.catalog.size, j.k + len(j.exclude)) for j in jobs]
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(wanted):
            if jobs[i].k == 0:
                continue
            groups.setdefault((max(k, 1) - 1).bit_length() // 2, []).append(i)
        return [(np.asarray(m, dtype=np.int64), max(wanted[i] for i in m)) for _, m in sorted(groups.items())]

    def warm(self, batch_size: int) -> None:
        """One full-size batch, so the first real requests do not pay ORT's first-run costs."""
        history = np.arange(self.max_history, dtype=np.int64) % max(self.n_items, 1)
        empty = np.zeros(0, dtype=np.int64)
        self.run_batch([Job("warm up " * 8, history, 10, empty) for _ in range(batch_size)])

    def probe(self) -> dict[str, Any]:
        """A real inference (query + one history item) and a top-1 search; raises if anything is off."""
        start = time.perf_counter()
        job = Job(query="probe", history=np.zeros(1, dtype=np.int64), k=1, exclude=np.zeros(0, dtype=np.int64))
        feeds = self.feeds([job.query], [job.history])
        h = self.sessions.encode_query(feeds, self.run_options)
        if h.shape != (1, self.manifest.dims.embed_dim) or not np.isfinite(h).all():
            raise KarmaError(f"probe inference returned {h.shape} with non-finite values: the encoder is broken")
        norm = float(np.linalg.norm(h))
        if abs(norm - 1.0) > 1e-3:
            raise KarmaError(f"probe embedding has norm {norm:.4f}, expected 1 (unit length)")
        scores, rows = self.index.search(h.astype(np.float32), 1)
        if rows[0, 0] < 0 or not np.isfinite(scores[0, 0]):
            raise KarmaError("probe search found nothing: the index is empty or broken")
        return {"ms": round((time.perf_counter() - start) * 1000, 3)}
