"""Summaries of load-generator results: latency percentiles, throughput, errors, CPU, A/B ratios."""

from __future__ import annotations

from typing import Any

import numpy as np

QUANTILES = (50, 90, 95, 99)


def percentiles(values: Any, quantiles: tuple[int, ...] = QUANTILES) -> dict[str, float]:
    """p50/p90/p95/p99 (and max, mean) of `values`; NaN for an empty list."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {**{f"p{q}": float("nan") for q in quantiles}, "max": float("nan"), "mean": float("nan")}
    out = {f"p{q}": float(np.percentile(a, q)) for q in quantiles}
    return {**out, "max": float(a.max()), "mean": float(a.mean())}


def _columns(result: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in result["records"].items()}


def window_mask(result: dict[str, Any], target: int | None = None) -> np.ndarray:
    """Requests sent inside the measured window (after warm-up), optionally of one target."""
    c = _columns(result)
    start, end = result["window_s"]
    mask = (c["sent"] >= start) & (c["sent"] < end) if len(c["sent"]) else np.zeros(0, bool)
    if target is not None and len(mask):
        mask &= c["target"] == target
    return mask


def summarize(result: dict[str, Any], target: int | None = None) -> dict[str, Any]:
    """One run (or one target of it): what was offered, what came back, how fast, at what CPU cost.

    latency_ms: done - sent of the 200 answers; lag_ms: sent - scheduled (the generator's own delay);
    throughput_rps: 200 answers completed inside the window (whenever sent) / window length.
    """
    c = _columns(result)
    start, end = result["window_s"]
    seconds = end - start
    mask = window_mask(result, target)
    status = c["status"][mask] if len(mask) else np.zeros(0, int)
    ok = status == 200
    latency = (c["done"][mask] - c["sent"][mask])[ok] * 1000 if len(mask) else np.zeros(0)
    lag = (c["sent"][mask] - c["scheduled"][mask]) * 1000 if len(mask) else np.zeros(0)
    answered = c["status"] == 200 if len(mask) else np.zeros(0, bool)  # whenever sent (a backlog counts too)
    if target is not None and len(mask):
        answered &= c["target"] == target
    done_in_window = int(((c["done"] >= start) & (c["done"] < end) & answered).sum()) if len(mask) else 0
    batches = c["batch"][mask][ok] if len(mask) else np.zeros(0)
    server = c["server_ms"][mask][ok] if len(mask) else np.zeros(0)
    errors = {str(int(s)): int((status == s).sum()) for s in np.unique(status[~ok])}
    cpu = result["cpu"]
    cpu_s = cpu["user_s"] + cpu["system_s"]
    all_requests = len(c["status"])
    return {
        "requests": int(mask.sum()),
        "ok": int(ok.sum()),
        "errors": errors,
        "error_count": int((~ok).sum()),
        "offered_rps": float(mask.sum() / seconds) if seconds > 0 else float("nan"),
        "throughput_rps": done_in_window / seconds if seconds > 0 else float("nan"),
        "latency_ms": percentiles(latency),
        "server_total_ms": percentiles(server[server >= 0]),
        "lag_ms": percentiles(lag),
        "mean_batch": float(batches[batches > 0].mean()) if (batches > 0).any() else float("nan"),
        "loadgen_cpu": {
            "cpu_s": cpu_s,
            "wall_s": cpu["wall_s"],
            "util": cpu_s / cpu["wall_s"] if cpu["wall_s"] else float("nan"),
            "us_per_request": cpu_s * 1e6 / all_requests if all_requests else float("nan"),
        },
        "window_s": seconds,
        "stale_connections": int(result.get("stale_connections", 0)),
    }


def sustained(summary: dict[str, Any], slo_p99_ms: float, min_share: float = 0.95) -> bool:
    """Whether a fixed-rate run kept up: no errors, >= min_share of the offered load answered in the
    window, and p99 latency within the SLO."""
    return (
        summary["error_count"] == 0
        and summary["ok"] > 0
        and summary["throughput_rps"] >= min_share * summary["offered_rps"]
        and summary["latency_ms"]["p99"] <= slo_p99_ms
    )


def ab_ratios(result: dict[str, Any], blocks: int) -> dict[str, Any]:
    """Interleaved A/B run: p50/p99 of each side, the B/A ratios pooled, and their spread over
    `blocks` consecutive blocks of the run (each block holds both sides' requests of its period)."""
    c = _columns(result)
    mask = window_mask(result) & (c["status"] == 200)
    target, sent, done = c["target"][mask], c["sent"][mask], c["done"][mask]
    latency = (done - sent) * 1000
    order = np.argsort(sent, kind="stable")
    target, latency = target[order], latency[order]

    def ratio(lat: np.ndarray, tgt: np.ndarray) -> dict[str, float]:
        a, b = percentiles(lat[tgt == 0]), percentiles(lat[tgt == 1])
        return {"a_p50": a["p50"], "a_p99": a["p99"], "b_p50": b["p50"], "b_p99": b["p99"],
                "p50": b["p50"] / a["p50"], "p99": b["p99"] / a["p99"], "n_a": int((tgt == 0).sum()),
                "n_b": int((tgt == 1).sum())}  # fmt: skip

    per_block = [
        ratio(lat, tgt)
        for lat, tgt in zip(np.array_split(latency, blocks), np.array_split(target, blocks), strict=True)
    ]
    spread = {}
    for key in ("p50", "p99"):
        values = np.array([b[key] for b in per_block])
        spread[key] = {
            "median": float(np.median(values)),
            "min": float(values.min()),
            "max": float(values.max()),
            "q25": float(np.percentile(values, 25)),
            "q75": float(np.percentile(values, 75)),
        }
    return {"pooled": ratio(latency, target), "blocks": per_block, "spread": spread}
