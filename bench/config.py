"""What `karma bench` runs: its parts and knobs (light: the CLI builds its flags from these defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PARTS = ("serving", "zero-cost", "stages", "floor", "index")


@dataclass
class BenchConfig:
    out: Path = Path("artifacts/bench")
    workdir: Path | None = None  # bundles are built here (default: <out>/work)
    bundle_a: Path | None = None  # action-only bundle
    bundle_b: Path | None = None  # karma bundle: the served one in part serving
    checkpoint: Path | None = None  # bundle_b's checkpoint (naive baseline)
    int8_bundle: Path | None = None  # part floor: the checkpoint's `karma export --quantize int8`, measured too
    parts: tuple[str, ...] = PARTS
    backends: tuple[str, ...] = ("service", "batching off", "naive")  # part serving: which of BACKENDS
    variants: list[str] = field(default_factory=list)  # part serving: more service backends, "NAME:KEY=V,KEY=V"
    profile: str = "tiny"  # the model the built bundles hold: a key of PROFILE_TRAIN / PROFILE_RUN
    train_sets: list[str] = field(default_factory=list)  # when building: training overrides
    items: int = 10_000  # when building: synthetic catalog size
    history: int | None = None  # history items per request (default: the model's max_history)
    history_mix: str = "fixed"  # fixed = every body has `history` items; uniform = 1..history items, drawn per body
    k: int = 10
    bodies: int = 2000  # distinct request bodies, cycled
    rates: list[float] = field(default_factory=lambda: [50.0, 100.0, 200.0, 400.0, 800.0])
    warmup_s: float = 2.0
    duration_s: float = 12.0
    concurrency: int = 32
    slo_p99_ms: float = 50.0
    ratio_band: float = 0.05  # part zero-cost: karma / action-only latency must lie within 1 +- this
    probes: int = 5
    probe_s: float = 8.0
    zero_cost_s: float = 60.0
    zero_cost_blocks: int = 6
    index_sizes: list[int] = field(default_factory=lambda: [100_000, 1_000_000])
    index_dim: int | None = None  # default: the served embedding dim (64 when no bundle is at hand)
    stage_requests: int = 1000  # part stages: sequential requests timed per stage
    floor_batches: list[int] = field(default_factory=lambda: [1, 8, 32])  # part floor (+ the service's mean batch)
    redis_url: str = "redis://127.0.0.1:6379/0"
    seed: int = 0
    quick: bool = False


# What `--quick` changes: a 1k-item tiny model, short runs, a small index bench (a smoke test, ~2-3 min).
QUICK = {
    "rates": [50.0, 200.0],
    "warmup_s": 0.5,
    "duration_s": 3.0,
    "concurrency": 16,
    "probes": 2,
    "probe_s": 3.0,
    "zero_cost_s": 6.0,
    "zero_cost_blocks": 4,
    "index_sizes": [50_000],
    "bodies": 300,
}


# Training overrides per model profile (`--profile`): what the built bundles hold. Latency does not depend
# on how well a model ranks, so training is brief; the architecture is what counts.
PROFILE_TRAIN = {
    # The project's default model: tiny Llama backbone (2 layers, hidden 64), D = 64, max_history 50.
    "tiny": [
        "train.threads=1",
        "train.steps=60",
        "train.semantic_warmup_steps=10",
        "train.checkpoint_every=1000000",
        "eval.max_users=200",
    ],
    # The tower people deploy (configs/smollm2-cpu.yaml): SmolLM2-135M-Instruct, first 4 decoder layers,
    # max_history 50; 20 steps of 8 windows (~2 min of training + 15 s of export per bundle on one core).
    "smollm2": [
        "model.backbone=smollm2-135m",
        "model.num_layers=4",
        "data.max_history=50",
        "loss.lm_vocab=catalog",
        "loss.reg_positions=2",
        "train.threads=1",
        "train.batch_size=8",
        "train.steps=20",
        "train.warmup_steps=5",
        "train.semantic_warmup_steps=5",
        "train.checkpoint_every=1000000",
        "eval.max_users=200",
    ],
}

# What each profile changes in the run besides the bundles: the SmolLM2 tower costs ~2 GFLOP per request
# (15-20 ms on one core), so its rate ladder is ~10x lower, and the index bench (model-independent) is left out.
PROFILE_RUN: dict[str, dict] = {
    "tiny": {},
    "smollm2": {
        "out": Path("artifacts/bench-smollm2"),
        "rates": [10.0, 20.0, 40.0, 80.0, 120.0],
        "concurrency": 16,
        "bodies": 1000,
        "stage_requests": 400,
        "ratio_band": 0.02,
        "parts": ("serving", "zero-cost", "stages", "floor"),
    },
}
