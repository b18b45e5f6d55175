"""`karma bench` at toy size: the real load generator against real servers (`karma serve`, the naive
PyTorch server), the naive backend's ranking against the ONNX service's, the index bench, the report.

No timing thresholds: these tests check that the pieces measure what they say, not how fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bench.index_bench import IndexCase, bench_size, recall_at_k
from bench.loadgen import arrival_offsets, assign, run_load
from bench.naive import naive_engine
from bench.runner import config_for, request_bodies, run_bench
from bench.stats import ab_ratios, summarize, sustained
from karma.config import ServeConfig
from karma.errors import KarmaError
from service.app import create_app
from tests.helpers import KARMA_BIN, REDIS_URL, needs_redis


def fake_run(latencies: dict[int, list[float]], status: dict[int, list[int]] | None = None) -> dict[str, Any]:
    """A load-generator result: requests 10 ms apart inside a [0, 10) s window, given latencies (ms) per target."""
    rows = []
    for target, values in latencies.items():
        for i, ms in enumerate(values):
            code = (status or {}).get(target, [200] * len(values))[i]
            rows.append((target, 0.01 * (2 * i + target), ms / 1000, code))
    rows.sort(key=lambda r: r[1])
    records = {"target": [], "scheduled": [], "sent": [], "done": [], "status": [], "batch": [], "server_ms": []}
    for target, sent, seconds, code in rows:
        for key, value in zip(records, (target, sent, sent, sent + seconds, code, 1, seconds * 500), strict=True):
            records[key].append(value)
    return {"records": records, "window_s": [0.0, 10.0], "cpu": {"user_s": 0.3, "system_s": 0.1, "wall_s": 10.0},
            "spec": {"targets": ["a", "b"]}}  # fmt: skip


def test_arrivals_interleaving_and_summaries() -> None:
    poisson = arrival_offsets(200, 10, "poisson", seed=1)
    assert abs(len(poisson) - 2000) < 4 * np.sqrt(2000) and poisson == sorted(poisson) and poisson[-1] < 10
    assert arrival_offsets(4, 1, "uniform", 0) == [0.0, 0.25, 0.5, 0.75]
    assert [assign(i, 2, "abba") for i in range(8)] == [0, 1, 1, 0, 0, 1, 1, 0]
    assert [assign(i, 3, "round_robin") for i in range(4)] == [0, 1, 2, 0]

    run = fake_run({0: [1.0] * 99 + [5.0], 1: [2.0] * 99 + [10.0]}, {0: [200] * 100, 1: [200] * 98 + [429, 0]})
    a, b = summarize(run, 0), summarize(run, 1)
    assert a["ok"] == 100 and a["error_count"] == 0 and a["latency_ms"]["p50"] == pytest.approx(1.0)
    assert b["ok"] == 98 and b["errors"] == {"0": 1, "429": 1}
    assert a["throughput_rps"] == pytest.approx(10.0) and a["loadgen_cpu"]["util"] == pytest.approx(0.04)
    assert sustained(a, slo_p99_ms=10) and not sustained(a, slo_p99_ms=0.5) and not sustained(b, slo_p99_ms=100)

    ab = ab_ratios(fake_run({0: [1.0] * 100, 1: [2.0] * 100}), blocks=4)
    assert ab["pooled"]["p50"] == pytest.approx(2.0) and len(ab["blocks"]) == 4
    assert ab["spread"]["p99"]["min"] == pytest.approx(2.0) and ab["blocks"][0]["n_a"] == 25


@contextlib.contextmanager
def one_answer_per_connection() -> Iterator[str]:
    """A server that answers one request per connection and then closes it without saying so (no
    `Connection: close`): what a kept-alive connection looks like after the server's idle timeout."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            start = head.index(b"content-length:") + 15
            await reader.readexactly(int(head[start : head.index(b"\r\n", start)]))
            body = b'{"batch_size":3}'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        async with server:
            await server.serve_forever()

    task = loop.create_task(serve())

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield f"http://127.0.0.1:{port[0]}"
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(10)


def test_load_generator_resends_on_connections_the_server_closed(tmp_path: Path) -> None:
    with one_answer_per_connection() as base:
        for mode in ("open", "closed"):
            spec = {"targets": [base], "bodies": [{"k": 1}], "mode": mode, "rate": 60, "concurrency": 2,
                    "warmup_s": 0.1, "duration_s": 0.6}  # fmt: skip
            result = run_load(spec, tmp_path, mode)
            s = summarize(result)
            assert s["requests"] > 5 and s["error_count"] == 0 and s["mean_batch"] == 3, (mode, s)
            assert result["stale_connections"] > 0 and sum(result["connections_opened"]) > s["requests"]


def test_index_bench_flat_is_exact_and_approximate_indexes_are_measured() -> None:
    assert recall_at_k(np.array([[1, 2, 3], [7, 8, -1]]), np.array([[3, 4, 1], [7, 8, 9]])) == pytest.approx(4 / 6)
    cases = [
        IndexCase("flat"),
        IndexCase("hnsw", {"m": 8, "ef_construction": 40}, [{"ef_search": 64}]),
        IndexCase(
            "ivfpq", {"nlist": 16, "m": 4, "nbits": 6}, [{"nprobe": 1}, {"nprobe": 16}, {"nprobe": 16, "rerank": 4}]
        ),
    ]
    rows = bench_size(2000, 16, cases, k=50, recall_queries=50, latency_queries=10, clusters=20)
    by = {(r["index"], r["params"].get("nprobe"), r["params"].get("rerank")): r for r in rows}
    by = {(kind, nprobe): r for (kind, nprobe, rerank), r in by.items() if rerank is None} | {
        ("ivfpq+rerank", 16): by[("ivfpq", 16, 4)]
    }
    assert len(rows) == 5 and by[("flat", None)]["recall@50"] == 1.0
    # Exact re-scoring of 4 x 50 candidates recovers what the PQ codes misorder.
    assert by[("ivfpq", 16)]["recall@50"] < by[("ivfpq+rerank", 16)]["recall@50"] <= 1.0
    assert by[("flat", None)]["bytes"] >= 2000 * 16 * 4 > by[("ivfpq", 16)]["bytes"]
    assert 0 < by[("ivfpq", 1)]["recall@50"] < by[("ivfpq", 16)]["recall@50"] < 1.0  # PQ codes are lossy
    assert 0.5 < by[("hnsw", None)]["recall@50"] <= 1.0
    assert all(r["latency_ms"]["p50"] > 0 and r["build_s"] >= 0 for r in rows)


@needs_redis
def test_naive_backend_ranks_like_the_onnx_service(tiny_export: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, bundle = tiny_export
    bodies, _ = request_bodies(bundle, 6, history=None, k=20, seed=3)
    bodies += [{"query": "red shoes", "k": 5}, {"history": bodies[0]["history"][:3], "k": 5}]
    settings = ServeConfig(bundle=bundle, intra_op_threads=1, access_log=False, redis_url=REDIS_URL)

    async def answers(factory: Any) -> tuple[list[dict], dict]:
        app = create_app(settings.model_copy(update={"max_batch_size": 1} if factory else {}), engine_factory=factory)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://karma") as client:
                got = [(await client.post("/search", json=body)).json() for body in bodies]
                return got, (await client.get("/info")).json()

    onnx, _ = asyncio.run(answers(None))
    torch_, info = asyncio.run(answers(partial(naive_engine, checkpoint=checkpoint)))
    assert "PyTorch" in info["session_providers"][0] and info["batching"]["max_batch_size"] == 1
    for a, b in zip(onnx, torch_, strict=True):
        assert len(a["items"]) == len(b["items"]) > 0 and b["batch_size"] == 1
        scores = np.array([i["score"] for i in a["items"]])
        np.testing.assert_allclose([i["score"] for i in b["items"]], scores, atol=1e-4)
        for pos, (x, y) in enumerate(zip(a["items"], b["items"], strict=True)):
            if x["item_id"] != y["item_id"]:  # only a near-tie may swap places
                assert np.ptp(scores[max(0, pos - 1) : pos + 2]) < 2e-4, (pos, x, y)

    # A checkpoint that is not the bundle's model is refused at start-up.
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    path = str(other / "model.safetensors")
    with safe_open(path, framework="np") as fh:
        metadata = fh.metadata()  # tied-weight aliases
    weights = load_file(path)
    weights["query_tower.out.weight"] = weights["query_tower.out.weight"] * 1.5 + 0.01
    save_file(weights, path, metadata=metadata)
    with pytest.raises(KarmaError, match="is not the model of bundle"):
        naive_engine(bundle, other)


def test_floor_counts_the_flops_export_counted_and_finds_every_weight_matmul(
    tiny_export: tuple[Path, Path], tmp_path: Path
) -> None:
    """The floor's FLOPs (FlopCounterMode on the served tower, fed by the service's own Engine.feeds) at the
    reference request equal the manifest's query_flops (export.cost, counted on the exported modules), and
    the GEMM shapes it prices are the graph's weight MatMuls: per decoder layer q, k, v, o, gate, up, down."""
    from bench.floor import counted_flops, sequence_tokens, weight_matmul_shapes
    from bench.naive import TorchQueryEncoder
    from karma.bundle import QUERY_ENCODER_FILE, load_bundle
    from service.engine import Engine

    checkpoint, bundle_dir = tiny_export
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    engine = Engine(bundle, bundle.open_sessions())
    words = " ".join(bundle.items["title"].astype(str).tolist()[:20])  # more tokens than max_query_tokens
    feeds = engine.feeds([words], [np.arange(m.max_history, dtype=np.int64)])
    assert sequence_tokens(feeds) == engine.max_query_tokens + m.max_history + 1
    tower = TorchQueryEncoder(checkpoint, m.dims.feature_dim).tower
    assert counted_flops(tower, feeds) == m.cost["query_flops"]
    shapes = weight_matmul_shapes(bundle.path(QUERY_ENCODER_FILE))
    hidden = m.dims.hidden
    # MLP down: (intermediate, hidden); the feature projection (feature_dim, hidden) is the other k > hidden
    downs = {k: c for (k, n), c in shapes.items() if n == hidden and hidden < k != m.dims.feature_dim}
    assert len(downs) == 1
    ((inner, layers),) = downs.items()
    assert layers >= 1 and shapes[(hidden, inner)] == 2 * layers  # gate and up of each layer
    assert shapes[(hidden, hidden)] >= 2 * layers  # q and o (k and v too without grouped-query attention)

    # An int8 export keeps the MLP down-projections fp32: its floor prices that share at the fp32 rate.
    from bench.floor import fp32_share
    from export.optimize import quantize_graph

    quantize_graph(bundle.path(QUERY_ENCODER_FILE), tmp_path / "q8.onnx")
    down = inner * hidden * layers
    everything = sum(k * n * c for (k, n), c in shapes.items())
    assert fp32_share(bundle.path(QUERY_ENCODER_FILE)) == 1.0
    assert fp32_share(tmp_path / "q8.onnx") == pytest.approx(down / everything)


@needs_redis
def test_karma_bench_runs_servers_and_load_generator_and_writes_the_report(
    tiny_export: tuple[Path, Path], tmp_path: Path
) -> None:
    """The real runner at toy size: `karma serve` (own process) under closed and open loop from the load
    generator (own process), the zero-cost A/B run against two `karma serve` processes (the same bundle
    twice), the index bench, and the report. (The naive server is the same app: see the test above.)"""
    checkpoint, bundle = tiny_export
    cfg = config_for(
        True, out=tmp_path / "out", bundle_a=bundle, bundle_b=bundle, checkpoint=checkpoint, backends=("service",),
        variants=["b2:serve.max_batch_size=2"], rates=[40.0], probes=0, warmup_s=0.2, duration_s=0.6, concurrency=4,
        zero_cost_s=0.8, zero_cost_blocks=2, index_sizes=[400], bodies=50, redis_url=REDIS_URL, stage_requests=30,
        floor_batches=[1, 4], history_mix="uniform", int8_bundle=bundle,  # (any bundle of the model: the code path)
    )  # fmt: skip
    results = run_bench(cfg, "karma bench --test")
    assert results["meta"]["steps"]["run"] == results["meta"]["steps"]["planned"]  # the progress bar's total
    lengths = {len(body["history"]) for body in request_bodies(bundle, 50, None, 10, 0, mix="uniform")[0]}
    assert len(lengths) > 5 and min(lengths) >= 1 and results["protocol"]["history_mix"] == "uniform"

    service = results["serving"]["backends"]["service"]
    for run in (service["saturation"], service["rates"][0]):
        assert run["ok"] > 0 and run["error_count"] == 0 and run["mean_batch"] >= 1.0
        assert run["loadgen_cpu"]["cpu_s"] > 0 and run["latency_ms"]["p50"] > 0 and run["server_cpu_util"] > 0
    assert service["rates"][0]["spec"]["mode"] == "open" and service["saturation"]["spec"]["concurrency"] == 4
    assert service["info"]["batching"]["max_batch_size"] == 32
    variant = results["serving"]["backends"]["b2"]  # --variant: the same service with other settings
    assert variant["info"]["batching"]["max_batch_size"] == 2 and variant["saturation"]["mean_batch"] <= 2.0
    assert variant["saturation"]["ok"] > 0 and variant["description"] == "karma serve --set serve.max_batch_size=2"

    stages = results["stages"]  # one request in flight: each answer's own timings
    assert stages["requests"] == 30 and stages["batch_size_max"] == 1 and 0 < stages["overhead_share_p50"] < 1
    st = stages["stages_ms"]
    assert 0 < st["encode"]["p50"] < st["total"]["p50"] <= st["client"]["p50"]

    floor = results["floor"]  # batch 1, 4 and the service's mean batch at its best sustained rate
    by_batch = {r["batch"]: r for r in floor["rows"]}
    assert {1, 4} <= set(by_batch) and floor["weight_matmuls"] == sum(w["count"] for w in floor["weight_shapes"])
    for r in floor["rows"]:
        assert r["flops_per_batch"] > 0 and r["ort_ms"]["1"] > 0 and r["floor_ms"]["1"] > 0
        assert r["gemm_gflop_s"]["1"] > 0 and r["floor_int8_ms"] > 0 and r["torch_eager_ms"] > 0
        assert r["ort_over_floor"]["1"] == pytest.approx(r["ort_ms"]["1"] / r["floor_ms"]["1"])
        assert r["int8_bundle_floor_ms"] == pytest.approx(r["floor_ms"]["1"])  # this "int8 bundle" is all fp32
        assert r["int8_ort_ms"] > 0 and r["int8_over_floor"] == pytest.approx(r["int8_ort_ms"] / r["floor_ms"]["1"])
    zc = results["zero_cost"]
    assert zc["identical_query_graphs"] and zc["a"]["error_count"] == zc["b"]["error_count"] == 0
    assert abs(zc["a"]["requests"] - zc["b"]["requests"]) <= 2 and zc["a"]["requests"] > 10  # ABBA, one in flight
    assert [r["recall@200"] for r in results["index"]["rows"] if r["index"] == "flat"] == [1.0]

    out = cfg.out
    saved = json.loads((out / "bench.json").read_text())
    assert saved["meta"]["machine"]["cores"] and saved["protocol"]["k"] == cfg.k
    md = (out / "bench.md").read_text()
    for needle in ("## Headline", "KARMA / action-only latency, p50", "(a) + (c)", "| service |", "(b) Zero added",
                   "(d) Exact vs approximate", "load generator CPU", "Load generator's own CPU"):  # fmt: skip
        assert needle in md, needle
    for needle in ("Where a request's time goes", "against the FLOP floor", "encoder time / FLOP floor, batch 1"):
        assert needle in md, needle
    for name in ("serving_latency.png", "zero_cost.png", "index.png", "floor.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_capacity_search_brackets_the_slo_rate() -> None:
    """Bisection between the ladder's last pass and first failure, with a fake server that sustains <= 230/s."""
    from bench.runner import Progress, find_capacity

    def run(rate: float, _: int = 0) -> dict[str, Any]:
        return {"rate": rate, "sustained": rate <= 230, "latency_ms": {"p99": 1.0 if rate <= 230 else 99.0}}

    ladder = [run(r) for r in (50, 100, 200, 400)] + [{"rate": 800, "skipped": "overloaded at 400/s"}]
    progress = Progress(total=6)
    got = find_capacity(run, ladder, saturation_rps=300, probes=6, progress=progress, name="fake")
    progress.close()
    lo, hi = got["bracket"]
    assert 200 <= lo <= 230 < hi <= 400 and hi / lo < 1.05 and got["rps"] == lo and not got["upper_assumed"]
    everything_passes = find_capacity(lambda r, i: {"rate": r, "sustained": True}, [], 100.0, 2, progress, "x")
    assert everything_passes["upper_assumed"] and everything_passes["rps"] == pytest.approx((65 * 130) ** 0.5)


def test_karma_bench_help_and_bad_parts() -> None:
    import subprocess

    help_ = subprocess.run([KARMA_BIN, "bench", "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--bundle-a" in help_.stdout and "zero-cost" in help_.stdout
    assert "Usage: karma bench" in help_.stdout  # typer, like every other command
    bad = subprocess.run([KARMA_BIN, "bench", "--parts", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --parts: unknown part(s) ['nope']; known: " + (
        "serving, zero-cost, stages, floor, index"
    )
    bad_variant = subprocess.run([KARMA_BIN, "bench", "--variant", "b8"], capture_output=True, text=True, timeout=60)
    assert bad_variant.returncode == 2 and "--variant 'b8': write NAME:KEY=VALUE" in bad_variant.stderr
    bad_profile = subprocess.run([KARMA_BIN, "bench", "--profile", "huge"], capture_output=True, text=True, timeout=60)
    assert bad_profile.returncode == 2
    assert "--profile: unknown profile 'huge'; known: tiny, smollm2" in bad_profile.stderr
    for args, says in (
        (["--quick", "--profile", "smollm2"], "--quick is the tiny model's smoke run"),
        (["--floor-batches", "0,8"], "--floor-batches: batch sizes must be >= 1"),
        (["--int8-bundle", "/nonexistent"], "--int8-bundle: /nonexistent is not a bundle folder"),
        (["--variant", "q:serve.bundle=/nope"], "--variant 'q': /nope is not a bundle folder"),
    ):
        got = subprocess.run([KARMA_BIN, "bench", *args], capture_output=True, text=True, timeout=60)
        assert got.returncode == 2 and says in got.stderr and "Traceback" not in got.stderr, (args, got.stderr)
    bad_mix = subprocess.run([KARMA_BIN, "bench", "--history-mix", "zipf"], capture_output=True, text=True, timeout=60)
    assert bad_mix.returncode == 2 and "--history-mix: 'zipf' is neither fixed nor uniform" in bad_mix.stderr
    typo = subprocess.run([KARMA_BIN, "bench", "--rates", "fast"], capture_output=True, text=True, timeout=60)
    assert typo.returncode == 2 and "'fast' is not a comma-separated list of floats" in typo.stderr
    assert "Traceback" not in typo.stderr
