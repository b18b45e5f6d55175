"""`karma bench`: the serving benchmark: one command, one run, side by side.

Parts (`--parts`, default all):

  serving    (a) + (c): `/search` of the service (`karma serve`: ONNX Runtime, micro-batching on), the
             same service with batching off (`serve.max_batch_size=1`) and the naive baseline
             (`bench.naive`: the PyTorch query tower per request, batch 1, same FastAPI app), one
             after the other, each under the same load: closed-loop saturation (`concurrency`
             requests in flight), open-loop Poisson arrivals at each fixed rate, and a bisection
             for the highest rate each sustains with p99 <= the SLO (no errors, >= 95% of the
             offered load answered). Throughput at equal p99 = those capacities side by side.
  zero-cost  (b): the service with the `action-only` bundle and the `karma` bundle of the same
             architecture, both running, requests interleaved A B B A (one in flight); p50/p99 of
             each, the karma/action-only ratios pooled and their spread over consecutive blocks.
  stages     where one request's time goes inside the server at low load (`bench.stages`): p50 per
             stage and the share outside encode + search.
  floor      the query encoder against this CPU's FLOP floor at batch 1/8/32 and the service's mean
             batch (`bench.floor`): ONNX Runtime at 1 and 2 threads, PyTorch eager, fp32 and int8 GEMM rates.
  index      (d): FAISS flat (exact) vs HNSW vs IVF-PQ at each size (`bench.index_bench`).

`--profile` picks the model of the built bundles (bench.config.PROFILE_TRAIN: the tiny default, or
SmolLM2-135M's first 4 layers) and the run knobs that suit it (PROFILE_RUN). `--variant` adds service
backends with other settings (e.g. token-budget vs count batching) to part serving.

Every server is its own process (1 ORT / torch / BLAS thread), and so is the load generator
(`bench.loadgen`), whose own CPU time is recorded per run; so is the server's (psutil).
Bundles: `--bundle-a` (action-only) / `--bundle-b` (karma, also the served bundle of part a/c) /
`--checkpoint` (bundle b's checkpoint, for the naive baseline), or else both are trained and
exported here with the real CLI (`karma train --preset ...`, `karma export`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from bench import harness
from bench.config import PARTS, PROFILE_RUN, PROFILE_TRAIN, QUICK, BenchConfig
from bench.loadgen import run_load
from bench.stats import ab_ratios, summarize, sustained
from karma.errors import KarmaError
from karma.machine import machine, machine_line

log = logging.getLogger("karma.bench")

PRESETS = ("action-only", "karma")
SERVED_PARTS = {"serving", "zero-cost", "stages", "floor"}  # the parts that need the served (karma) bundle


class Progress:
    """One tqdm bar over the planned steps plus a log line per step."""

    def __init__(self, total: int):
        from karma.progress import progress_bar

        self.bar = progress_bar(total=total, unit="step", desc="karma bench", file=sys.stderr, leave=True)
        self.n = 0

    def step(self, what: str) -> None:
        self.n += 1
        self.bar.set_postfix_str(what[:60])
        log.info("[%d/%d] %s", self.n, self.bar.total, what)

    def done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def plan_steps(cfg: BenchConfig, build: bool) -> int:
    steps = 2 if build else 0
    if "serving" in cfg.parts:
        steps += (len(cfg.backends) + len(cfg.variants)) * (1 + len(cfg.rates) + cfg.probes)
    steps += sum(part in cfg.parts for part in ("zero-cost", "stages", "floor"))
    if "index" in cfg.parts:
        steps += len(cfg.index_sizes)
    return steps


# ---- the machine -----------------------------------------------------------------------------------


# ---- bundles and requests ----------------------------------------------------------------------------


@dataclass
class Bundles:
    a: Path | None  # action-only
    b: Path | None  # karma (served)
    checkpoint: Path | None  # of b
    built: bool
    build_s: float = 0.0


def train_overrides(cfg: BenchConfig) -> list[str]:
    if cfg.profile not in PROFILE_TRAIN:
        raise KarmaError(f"--profile: unknown profile {cfg.profile!r}; known: {', '.join(PROFILE_TRAIN)}")
    if cfg.quick and cfg.profile == "tiny":
        base = list(harness.TINY)
    else:
        base = [*PROFILE_TRAIN[cfg.profile], f"data.synthetic.n_items={cfg.items}"]
    return base + cfg.train_sets


def prepare_bundles(cfg: BenchConfig, progress: Progress) -> Bundles:
    need_a = "zero-cost" in cfg.parts
    need_b = bool(SERVED_PARTS & set(cfg.parts))
    need_ckpt = bool({"serving", "floor"} & set(cfg.parts))
    given = (not need_a or cfg.bundle_a) and (not need_b or cfg.bundle_b) and (not need_ckpt or cfg.checkpoint)
    if given or not need_b:
        return Bundles(cfg.bundle_a, cfg.bundle_b, cfg.checkpoint, built=False)
    if cfg.bundle_a or cfg.bundle_b or cfg.checkpoint:
        raise KarmaError(
            "give all of --bundle-a, --bundle-b and --checkpoint that the chosen parts need "
            f"({', '.join(cfg.parts)}), or none of them (then both bundles are built)"
        )
    workdir = cfg.workdir or cfg.out / "work"
    sets = train_overrides(cfg)
    started = time.perf_counter()
    built = {}
    for preset in PRESETS:
        progress.step(f"build the {preset} bundle (karma train --preset {preset}; karma export)")
        built[preset] = harness.build_bundle(workdir, sets, run_name=preset, preset=preset)
        progress.done()
    return Bundles(
        built["action-only"],
        built["karma"],
        harness.checkpoint_of(workdir, "karma"),
        built=True,
        build_s=time.perf_counter() - started,
    )


def check_options(cfg: BenchConfig) -> None:
    """KarmaError for options that would only fail after minutes of building and measuring."""
    from karma.bundle import MANIFEST_FILE

    chosen = chosen_backends(cfg)
    check_history_mix(cfg.history_mix)
    if cfg.quick and cfg.profile != "tiny":
        raise KarmaError(f"--quick is the tiny model's smoke run; for --profile {cfg.profile} set --rates/--duration")
    if any(b < 1 for b in cfg.floor_batches):
        raise KarmaError(f"--floor-batches: batch sizes must be >= 1, got {cfg.floor_batches}")
    bundles = [("--int8-bundle", cfg.int8_bundle)] if cfg.int8_bundle else []
    bundles += [(f"--variant {b.name!r}", Path(x.partition("=")[2])) for b in chosen for x in b.sets
                if x.startswith("serve.bundle=")]  # fmt: skip
    for option, path in bundles:
        if not (path / MANIFEST_FILE).is_file():
            raise KarmaError(f"{option}: {path} is not a bundle folder (no {MANIFEST_FILE})")
    if cfg.int8_bundle and "floor" not in cfg.parts:
        raise KarmaError("--int8-bundle is measured by part floor, which --parts leaves out")


def check_history_mix(mix: str) -> None:
    if mix not in ("fixed", "uniform"):
        raise KarmaError(f"--history-mix: {mix!r} is neither fixed nor uniform")


def request_bodies(
    bundle: Path, n: int, history: int | None, k: int, seed: int, mix: str = "fixed"
) -> tuple[list[dict], dict]:
    """`n` /search bodies: a query (the first 4 words of a random catalog title) and `history` random
    catalog items (default: the model's max_history; mix "uniform": 1..that many, drawn per body),
    k results, history excluded."""
    from karma.bundle import load_bundle

    b = load_bundle(bundle, verify_checksums=False, check_graphs=False, with_index=False)
    m = b.manifest
    length = m.max_history if history is None else history
    ids = b.items["item_id"].astype(str).tolist()
    titles = b.items["title"].astype(str).tolist() if "title" in b.items.columns else [""]
    check_history_mix(mix)
    rng = random.Random(seed)
    most = min(length, len(ids))
    bodies = [
        {
            "query": " ".join(rng.choice(titles).split()[:4]),
            "history": rng.sample(ids, most if mix == "fixed" else rng.randint(1, max(1, most))),
            "k": k,
            "exclude_history": True,
        }
        for _ in range(n)
    ]
    protocol = {
        "n_items": m.n_items,
        "history_items": most,
        "history_mix": mix,
        "max_history": m.max_history,
        "k": k,
        "distinct_bodies": n,
        "embed_dim": m.dims.embed_dim,
        "feature_dim": m.dims.feature_dim,
        "hidden": m.dims.hidden,
        "index": m.index.type,
        "backbone": m.training.backbone,
        "request": "POST /search {query: 4 title words, history: item ids (in the body: no Redis read), k, "
        "exclude_history: true}",
    }
    return bodies, protocol


# ---- servers -------------------------------------------------------------------------------------------


def server_process(base: str) -> Any:
    """The psutil process of the server we started on `base` (a child of this process)."""
    import psutil

    port = base.rsplit(":", 1)[1]
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmd = child.cmdline()
            if "--port" in cmd and cmd[cmd.index("--port") + 1] == port:
                return child
    return None


def cpu_seconds(proc: Any) -> float:
    if proc is None:
        return float("nan")
    t = proc.cpu_times()
    return t.user + t.system


def server_info(base: str) -> dict[str, Any]:
    import httpx

    info = httpx.get(f"{base}/info", timeout=30).json()
    keep = ("model_version", "n_items", "dims", "max_history", "index", "parameters", "flops_per_request",
            "session_providers", "batching", "intra_op_threads", "training")  # fmt: skip
    return {k: info.get(k) for k in keep}


@dataclass
class Backend:
    name: str
    description: str
    sets: list[str]
    naive: bool = False


BACKENDS = [
    Backend("service", "karma serve as configured by default: ONNX Runtime, micro-batching on", []),
    Backend(
        "batching off", "karma serve --set serve.max_batch_size=1 (otherwise identical)", ["serve.max_batch_size=1"]
    ),
    Backend(
        "naive",
        "PyTorch eager query tower per request (batch 1, 1 thread) in the same FastAPI app (python -m bench.naive)",
        [],
        naive=True,
    ),
]


def chosen_backends(cfg: BenchConfig) -> list[Backend]:
    """The built-in backends named by cfg.backends, then one service backend per --variant."""
    unknown = set(cfg.backends) - {b.name for b in BACKENDS}
    if unknown:
        raise KarmaError(f"unknown backend(s) {sorted(unknown)}; choose from {', '.join(b.name for b in BACKENDS)}")
    out = [b for b in BACKENDS if b.name in cfg.backends]
    for text in cfg.variants:
        name, sep, sets = text.partition(":")
        settings = [x.strip() for x in sets.split(",") if x.strip()]
        if not sep or not name.strip() or not settings or any("=" not in x for x in settings):
            raise KarmaError(
                f"--variant {text!r}: write NAME:KEY=VALUE[,KEY=VALUE...], e.g. 'b8:serve.max_batch_size=8'"
            )
        if name.strip() in {b.name for b in out}:
            raise KarmaError(f"--variant {text!r}: backend name {name.strip()!r} is taken")
        out.append(Backend(name.strip(), "karma serve --set " + " --set ".join(settings), settings))
    return out


@contextlib.contextmanager
def serving(backend: Backend, bundles: Bundles, cfg: BenchConfig) -> Iterator[str]:
    entry = None
    if backend.naive:
        if bundles.checkpoint is None:
            raise KarmaError("the naive baseline needs bundle b's training checkpoint (--checkpoint)")
        entry = [sys.executable, "-m", "bench.naive", "--checkpoint", str(bundles.checkpoint)]
    assert bundles.b is not None
    bundle, sets = bundles.b, []
    for setting in backend.sets:  # a variant may serve another bundle (e.g. the int8 export of the same model)
        if setting.startswith("serve.bundle="):
            bundle = Path(setting.partition("=")[2])
        else:
            sets.append(setting)
    # The server runs from the repository root: give it absolute paths, as the in-process parts read them.
    with harness.karma_serve(bundle.resolve(), cfg.redis_url, sets=sets, entry=entry, timeout_s=300) as (base, _):
        yield base


def measured(
    base: list[str], bodies: list[dict], raw: Path, name: str, proc: Any, **spec: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One load-generator run; returns (summary incl. server CPU, the raw result)."""
    cpu0, wall0 = cpu_seconds(proc), time.perf_counter()
    result = run_load({"targets": base, "bodies": bodies, **spec}, raw, name)
    cpu1, wall1 = cpu_seconds(proc), time.perf_counter()
    summary = summarize(result)
    summary["server_cpu_util"] = (cpu1 - cpu0) / (wall1 - wall0)
    summary["spec"] = {k: v for k, v in result["spec"].items() if k != "targets"}
    return summary, result


def run_serving(cfg: BenchConfig, bundles: Bundles, bodies: list[dict], progress: Progress) -> dict[str, Any]:
    raw = cfg.out / "raw"
    out: dict[str, Any] = {}
    latencies: dict[str, list[float]] = {}
    for backend in chosen_backends(cfg):
        slug = backend.name.replace(" ", "-")
        progress.step(f"{backend.name}: start the server, saturation (closed loop, {cfg.concurrency} in flight)")
        with serving(backend, bundles, cfg) as base:
            proc = server_process(base)
            info = server_info(base)
            window = {"warmup_s": cfg.warmup_s, "duration_s": cfg.duration_s, "seed": cfg.seed}
            saturation, result = measured(
                [base], bodies, raw, f"{slug}-saturation", proc, mode="closed", concurrency=cfg.concurrency, **window
            )
            latencies[backend.name] = _window_latencies(result)
            progress.done()
            rates = []
            overloaded_at = None
            for rate in cfg.rates:
                progress.step(f"{backend.name}: open loop, Poisson arrivals at {rate:g}/s")
                if overloaded_at is not None:
                    rates.append({"rate": rate, "skipped": f"overloaded at {overloaded_at:g}/s"})
                else:
                    s, _ = measured([base], bodies, raw, f"{slug}-rate{rate:g}", proc, mode="open", rate=rate, **window)
                    s["rate"] = rate
                    s["sustained"] = sustained(s, cfg.slo_p99_ms)
                    rates.append(s)
                    if s["throughput_rps"] < 0.5 * s["offered_rps"]:
                        overloaded_at = rate  # higher rates would only be floods of 429s
                progress.done()

            def probe(rate: float, i: int, base: str = base, proc: Any = proc, slug: str = slug) -> dict[str, Any]:
                window = {"warmup_s": min(cfg.warmup_s, 1.0), "duration_s": cfg.probe_s, "seed": cfg.seed + 1 + i}
                s, _ = measured([base], bodies, raw, f"{slug}-probe{i}", proc, mode="open", rate=rate, **window)
                s["rate"] = rate
                s["sustained"] = sustained(s, cfg.slo_p99_ms)
                return s

            capacity = find_capacity(probe, rates, saturation["throughput_rps"], cfg.probes, progress, backend.name)
        out[backend.name] = {
            "description": backend.description,
            "info": info,
            "saturation": saturation,
            "rates": rates,
            "capacity": capacity,
        }
    return {"backends": out, "latencies_at_saturation_ms": latencies, "headline": serving_headline(out, cfg)}


def _window_latencies(result: dict[str, Any], by_target: bool = False) -> Any:
    """Latencies (ms) of the window's 200 answers: one list, or one list per target."""
    import numpy as np

    from bench.stats import window_mask

    r = {k: np.asarray(v) for k, v in result["records"].items()}
    mask = window_mask(result) & (r["status"] == 200)
    ms = ((r["done"] - r["sent"]) * 1000).round(4)
    if not by_target:
        return ms[mask].tolist()
    return [ms[mask & (r["target"] == t)].tolist() for t in range(len(result["spec"]["targets"]))]


def find_capacity(
    probe: Callable[[float, int], dict[str, Any]],
    ladder: list[dict[str, Any]],
    saturation_rps: float,
    probes: int,
    progress: Progress,
    name: str,
) -> dict[str, Any]:
    """Highest arrival rate sustained within the SLO: bisection (geometric) between the highest
    ladder rate that passed and the lowest that failed (or 1.3x the saturation throughput)."""
    ran = [r for r in ladder if "skipped" not in r]
    passed = [r["rate"] for r in ran if r["sustained"]]
    lo = max(passed, default=0.0)
    failed = [r["rate"] for r in ran if not r["sustained"] and r["rate"] > lo]
    hi = min(failed, default=max(1.3 * saturation_rps, 1.3 * lo, 1.0))
    tried = []
    for i in range(probes):
        rate = math.sqrt(lo * hi) if lo > 0 else hi / 2
        progress.step(f"{name}: capacity probe {i + 1}/{probes} at {rate:.0f}/s (bracket {lo:.0f}-{hi:.0f})")
        s = probe(rate, i)
        tried.append(s)
        if s["sustained"]:
            lo = rate
        else:
            hi = rate
        progress.done()
    # upper_assumed: no run failed, so the top of the bracket is an assumption, not a measurement
    upper_assumed = not failed and all(p["sustained"] for p in tried)
    return {"rps": lo, "bracket": [lo, hi], "probes": tried, "upper_assumed": upper_assumed}


def serving_headline(backends: dict[str, Any], cfg: BenchConfig) -> dict[str, Any]:
    def ratio(a: float, b: float) -> float:
        return a / b if b and b > 0 and not math.isnan(b) else float("nan")

    svc, off, naive = (backends.get(n) for n in ("service", "batching off", "naive"))
    out: dict[str, Any] = {"slo_p99_ms": cfg.slo_p99_ms}
    if svc and naive:
        out["throughput_ratio_vs_naive_at_equal_p99"] = ratio(svc["capacity"]["rps"], naive["capacity"]["rps"])
        out["saturation_ratio_vs_naive"] = ratio(
            svc["saturation"]["throughput_rps"], naive["saturation"]["throughput_rps"]
        )
    if svc and off:
        out["batching_gain_at_equal_p99"] = ratio(svc["capacity"]["rps"], off["capacity"]["rps"])
        out["batching_gain_saturation"] = ratio(
            svc["saturation"]["throughput_rps"], off["saturation"]["throughput_rps"]
        )
        # The highest fixed rate both kept up with (no errors, >= 95% answered), whatever their p99.
        both = [
            (a, b)
            for a, b in zip(svc["rates"], off["rates"], strict=True)
            if "skipped" not in a and "skipped" not in b and sustained(a, math.inf) and sustained(b, math.inf)
        ]
        if both:
            a, b = both[-1]
            out["batching_at_highest_common_rate"] = {
                "rate": a["rate"],
                "on_ms": {"p50": a["latency_ms"]["p50"], "p99": a["latency_ms"]["p99"]},
                "off_ms": {"p50": b["latency_ms"]["p50"], "p99": b["latency_ms"]["p99"]},
            }
    return out


# ---- zero added cost ------------------------------------------------------------------------------------


def run_zero_cost(cfg: BenchConfig, bundles: Bundles, bodies: list[dict], progress: Progress) -> dict[str, Any]:
    from export.compare import graph_signature
    from karma.bundle import QUERY_ENCODER_FILE

    assert bundles.a is not None and bundles.b is not None
    progress.step(f"zero added cost: action-only vs karma, interleaved ABBA, {cfg.zero_cost_s:g} s")
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(2) as pool:  # both servers start at once
        starting = [pool.submit(stack.enter_context, harness.karma_serve(b, cfg.redis_url, timeout_s=300))
                    for b in (bundles.a, bundles.b)]  # fmt: skip
        (base_a, _), (base_b, _) = (f.result() for f in starting)
        infos = [server_info(base_a), server_info(base_b)]
        result = run_load(
            {"targets": [base_a, base_b], "interleave": "abba", "bodies": bodies, "mode": "closed", "concurrency": 1,
             "warmup_s": cfg.warmup_s, "duration_s": cfg.zero_cost_s, "seed": cfg.seed},
            cfg.out / "raw", "zero-cost",
        )  # fmt: skip
    progress.done()
    sig_a, sig_b = (graph_signature(b / QUERY_ENCODER_FILE) for b in (bundles.a, bundles.b))
    ab = ab_ratios(result, cfg.zero_cost_blocks)
    lat = _window_latencies(result, by_target=True)
    return {
        "bundles": {"a": str(bundles.a), "b": str(bundles.b)},
        "info": {"a": infos[0], "b": infos[1]},
        "identical_query_graphs": sig_a == sig_b,
        "a": summarize(result, 0),
        "b": summarize(result, 1),
        "ratio": ab,
        "blocks": cfg.zero_cost_blocks,
        "loadgen_cpu": summarize(result)["loadgen_cpu"],
        "latencies_ms": {"a": lat[0], "b": lat[1]},
        "protocol": "both servers up; one request in flight; requests alternate A B B A; same bodies",
    }


# ---- stages and the FLOP floor -------------------------------------------------------------------------


def run_stages_part(cfg: BenchConfig, bundles: Bundles, bodies: list[dict], progress: Progress) -> dict[str, Any]:
    from bench.stages import run_stages

    assert bundles.b is not None
    progress.step(f"stages: {cfg.stage_requests} sequential searches, timings per server stage")
    with harness.karma_serve(bundles.b, cfg.redis_url, timeout_s=300) as (base, _):
        info = server_info(base)
        out = run_stages(base, bodies, cfg.stage_requests)
    progress.done()
    return {**out, "info": info, "protocol": "one request in flight, sequential, one keep-alive connection"}


def service_mean_batch(results: dict[str, Any]) -> float | None:
    """The service's mean batch at its capacity (the last sustained probe or ladder rate), if serving ran."""
    svc = results.get("serving", {}).get("backends", {}).get("service")
    if not svc:
        return None
    runs = [r for r in [*svc["rates"], *svc["capacity"]["probes"]] if "skipped" not in r and r.get("sustained")]
    if not runs:
        return None
    best = max(runs, key=lambda r: r["rate"])
    return best.get("mean_batch")


def run_floor_part(cfg: BenchConfig, bundles: Bundles, bodies: list[dict], progress: Progress,
                   typical: float | None) -> dict[str, Any]:  # fmt: skip
    from bench.floor import run_floor

    assert bundles.b is not None and bundles.checkpoint is not None
    typical = None if typical is None or math.isnan(typical) else typical
    sizes = sorted({*cfg.floor_batches, *([max(1, round(typical))] if typical else [])})
    progress.step(f"floor: encoder time vs FLOP floor at batch {', '.join(map(str, sizes))}")
    out = run_floor(bundles.b, bundles.checkpoint, bodies, sizes, int8_bundle=cfg.int8_bundle)
    progress.done()
    out["service_mean_batch"] = typical
    return out


# ---- index --------------------------------------------------------------------------------------------------


def run_index(cfg: BenchConfig, dim: int, progress: Progress) -> dict[str, Any]:
    from bench.index_bench import bench_size, default_cases

    rows = []
    for n in cfg.index_sizes:
        progress.step(f"index: flat vs HNSW vs IVF-PQ over {n:,} x {dim} vectors")
        rows.extend(bench_size(n, dim, default_cases(n), seed=cfg.seed))
        progress.done()
    return {"rows": rows, "dim": dim}


# ---- the whole run -----------------------------------------------------------------------------------------


def run_bench(cfg: BenchConfig, command: str | None = None) -> dict[str, Any]:
    """Run the chosen parts; write bench.json, bench.md and the PNG plots under cfg.out; return the results."""
    from bench.report import write_report

    unknown = set(cfg.parts) - set(PARTS)
    if unknown:
        raise KarmaError(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    started = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or "karma bench",
        "machine": machine(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
    }
    log.info("karma bench on %s; results under %s", machine_line(meta["machine"]), cfg.out)
    build = not (cfg.bundle_b or cfg.bundle_a or cfg.checkpoint) and bool(SERVED_PARTS & set(cfg.parts))
    progress = Progress(plan_steps(cfg, build))
    results: dict[str, Any] = {"meta": meta}
    with contextlib.ExitStack() as stack:
        stack.enter_context(logging_redirect_tqdm())  # log lines print above the progress bar
        stack.callback(progress.close)
        bundles = prepare_bundles(cfg, progress)
        results["bundles"] = {
            "action_only": str(bundles.a),
            "karma": str(bundles.b),
            "checkpoint": str(bundles.checkpoint),
            "built_here": bundles.built,
            "build_s": bundles.build_s,
            "train_overrides": train_overrides(cfg) if bundles.built else None,
        }
        dim = cfg.index_dim or 64
        bodies: list[dict] = []
        if bundles.b is not None:
            bodies, protocol = request_bodies(bundles.b, cfg.bodies, cfg.history, cfg.k, cfg.seed, cfg.history_mix)
            results["protocol"] = protocol
            dim = cfg.index_dim or protocol["embed_dim"]
        if "serving" in cfg.parts:
            results["serving"] = run_serving(cfg, bundles, bodies, progress)
        if "zero-cost" in cfg.parts:
            results["zero_cost"] = run_zero_cost(cfg, bundles, bodies, progress)
        if "stages" in cfg.parts:
            results["stages"] = run_stages_part(cfg, bundles, bodies, progress)
        if "floor" in cfg.parts:
            results["floor"] = run_floor_part(cfg, bundles, bodies, progress, service_mean_batch(results))
        if "index" in cfg.parts:
            results["index"] = run_index(cfg, dim, progress)
    meta["steps"] = {"planned": progress.bar.total, "run": progress.n}
    meta["elapsed_s"] = time.perf_counter() - started
    meta["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    paths = write_report(results, cfg.out)
    log.info("karma bench: %.0f s; wrote %s", meta["elapsed_s"], ", ".join(str(p) for p in paths))
    return results


def config_for(quick: bool, **given: Any) -> BenchConfig:
    """Defaults (the profile's, then quick's) with the options the user gave (None = not given)."""
    profile = given.get("profile") or "tiny"
    if profile not in PROFILE_RUN:
        raise KarmaError(f"--profile: unknown profile {profile!r}; known: {', '.join(PROFILE_RUN)}")
    cfg = replace(BenchConfig(quick=quick, profile=profile), **PROFILE_RUN[profile])
    if quick:
        cfg = replace(cfg, **QUICK)
    return replace(cfg, **{k: v for k, v in given.items() if v is not None})


# ---- command line (`karma bench`, built in recipes/cli.py) ----------------------------------------------------


def main(quick: bool, given: dict[str, Any], command: str) -> dict[str, Any]:
    """`karma bench …`: run with the given options (None = default), write the results, print the tables."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if given.get("redis_url") is None:
        from karma.config import load_config

        given["redis_url"] = load_config().serve.redis_url
    unknown = sorted(set(given.get("parts") or ()) - set(PARTS))
    if unknown:
        raise KarmaError(f"--parts: unknown part(s) {unknown}; known: {', '.join(PARTS)}")
    cfg = config_for(quick, **given)
    check_options(cfg)  # a bad option fails here, not after the bundles are built
    results = run_bench(cfg, command)
    print((cfg.out / "bench.md").read_text())
    return results
