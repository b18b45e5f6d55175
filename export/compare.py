"""The zero-added-serving-cost report: two bundles' served graphs side by side.

KARMA's claim is that its regularizers cost nothing at serving time because every train-only
head is dropped at export. This report checks it on the artefacts users actually deploy: for the
query and item encoders of two bundles (e.g. `action-only` and `karma` of one architecture) it
compares node counts, op histograms, initializer names and shapes, inputs/outputs, served
parameter counts and FLOPs per request, and fails if anything but weight values differs. It then
times both query encoders in one process, interleaved request by request on identical inputs,
so machine noise hits both equally, and reports medians, p99 and their ratio.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from karma.bundle import ITEM_ENCODER_FILE, QUERY_ENCODER_FILE, Bundle, load_bundle


def graph_signature(path: Path) -> dict[str, Any]:
    """Everything about an ONNX graph except its weight values."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    return {
        "nodes": len(graph.node),
        "op_histogram": dict(sorted(Counter(n.op_type for n in graph.node).items())),
        "initializers": sorted((i.name, tuple(i.dims), i.data_type) for i in graph.initializer),
        "parameters": int(sum(int(np.prod(i.dims)) for i in graph.initializer)),
        "inputs": [(i.name, str(i.type.tensor_type)) for i in graph.input],
        "outputs": [(o.name, str(o.type.tensor_type)) for o in graph.output],
        "opset": [(o.domain, o.version) for o in model.opset_import],
    }


def _request_feeds(bundle: Bundle, rng: np.random.Generator, history: int) -> dict[str, np.ndarray]:
    """One realistic request: a catalog title as the query and `history` random catalog items."""
    manifest = bundle.manifest
    title_field = manifest.item_text_fields[0] if manifest.item_text_fields else None
    text = str(bundle.items[title_field].iloc[int(rng.integers(manifest.n_items))]) if title_field else ""
    items = rng.integers(0, manifest.n_items, history)
    return bundle.query_feeds([text], [items])


def time_interleaved(a: Bundle, b: Bundle, requests: int, history: int, seed: int = 0) -> dict[str, Any]:
    """Latency of both query encoders, alternating A/B (and B/A) per request on the same inputs."""
    sessions = [a.open_sessions(), b.open_sessions()]
    rng = np.random.default_rng(seed)
    feeds = [_request_feeds(a, rng, history) for _ in range(min(requests, 64))]
    for f in feeds[:8]:  # warm up both
        for s in sessions:
            s.encode_query(f)
    times: list[list[float]] = [[], []]
    for i in range(requests):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            start = time.perf_counter()
            sessions[which].encode_query(feeds[i % len(feeds)])
            times[which].append(time.perf_counter() - start)
    stats = []
    for t in times:
        ms = np.asarray(t) * 1e3
        stats.append(
            {"p50_ms": float(np.median(ms)), "p99_ms": float(np.quantile(ms, 0.99)), "mean_ms": float(ms.mean())}
        )
    return {
        "requests": requests,
        "history_items": history,
        "batch": 1,
        "a": stats[0],
        "b": stats[1],
        "p50_ratio_b_over_a": stats[1]["p50_ms"] / stats[0]["p50_ms"],
        "p99_ratio_b_over_a": stats[1]["p99_ms"] / stats[0]["p99_ms"],
    }


def compare_bundles(a_dir: Path, b_dir: Path, requests: int = 300, history: int | None = None) -> dict[str, Any]:
    a, b = load_bundle(a_dir), load_bundle(b_dir)
    differences: list[str] = []
    graphs = {}
    for name in (QUERY_ENCODER_FILE, ITEM_ENCODER_FILE):
        sa, sb = graph_signature(a.path(name)), graph_signature(b.path(name))
        graphs[name] = {"a": {k: v for k, v in sa.items() if k != "initializers"},
                        "b": {k: v for k, v in sb.items() if k != "initializers"}}  # fmt: skip
        for key in sa:
            if sa[key] != sb[key]:
                differences.append(f"{name}: {key} differs")
    for key in ("served_parameters", "cost"):
        va, vb = getattr(a.manifest, key), getattr(b.manifest, key)
        if key == "served_parameters":
            va = {k: v for k, v in va.items() if k != "checkpoint_total"}
            vb = {k: v for k, v in vb.items() if k != "checkpoint_total"}
        if va != vb:
            differences.append(f"manifest {key} differs: {va} vs {vb}")
    if a.manifest.dims != b.manifest.dims:
        differences.append("dims differ")
    latency = time_interleaved(a, b, requests, history if history is not None else a.manifest.max_history)
    return {
        "a": {"bundle": str(a_dir), "preset": a.manifest.training.preset, "model_version": a.model_version},
        "b": {"bundle": str(b_dir), "preset": b.manifest.training.preset, "model_version": b.model_version},
        "identical_served_graphs": not differences,
        "differences": differences,
        "graphs": graphs,
        "served_parameters": {"a": a.manifest.served_parameters, "b": b.manifest.served_parameters},
        "cost": {"a": a.manifest.cost, "b": b.manifest.cost},
        "dropped_train_only_parameters": {
            "a": sum(d.parameters for d in a.manifest.dropped),
            "b": sum(d.parameters for d in b.manifest.dropped),
        },
        "latency": latency,
    }
