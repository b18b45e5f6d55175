"""What `karma bench` runs: its parts and knobs (light: the CLI builds its flags from these defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PARTS = ("serving", "zero-cost", "index")


@dataclass
class BenchConfig:
    out: Path = Path("artifacts/bench")
    workdir: Path | None = None  # bundles are built here (default: <out>/work)
    bundle_a: Path | None = None  # action-only bundle
    bundle_b: Path | None = None  # karma bundle: the served one in part serving
    checkpoint: Path | None = None  # bundle_b's checkpoint (naive baseline)
    parts: tuple[str, ...] = PARTS
    backends: tuple[str, ...] = ("service", "batching off", "naive")  # part serving: which of BACKENDS
    train_sets: list[str] = field(default_factory=list)  # when building: training overrides
    items: int = 10_000  # when building: synthetic catalog size
    history: int | None = None  # history items per request (default: the model's max_history)
    k: int = 10
    bodies: int = 2000  # distinct request bodies, cycled
    rates: list[float] = field(default_factory=lambda: [50.0, 100.0, 200.0, 400.0, 800.0])
    warmup_s: float = 2.0
    duration_s: float = 12.0
    concurrency: int = 32
    slo_p99_ms: float = 50.0
    probes: int = 5
    probe_s: float = 8.0
    zero_cost_s: float = 60.0
    zero_cost_blocks: int = 6
    index_sizes: list[int] = field(default_factory=lambda: [100_000, 1_000_000])
    index_dim: int | None = None  # default: the served embedding dim (64 when no bundle is at hand)
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
