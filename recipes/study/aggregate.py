"""Numbers across seeds: mean ± sample std per preset, and paired deltas against action-only.

Pure functions over the `study_run.json` payloads, so the report can be regenerated (and tested)
without a model in memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from recipes.study.config import REFERENCE_PRESET

METRIC_KEYS = ("HR@10", "HR@50", "HR@200", "NDCG@10", "NDCG@50", "NDCG@200", "MRR")


def spread(values: Sequence[float]) -> dict[str, Any]:
    """{mean, std (sample, ddof=1; None for one value), n, values}; NaN/None values are skipped."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"mean": None, "std": None, "n": 0, "values": []}
    arr = np.asarray(finite)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else None,
        "n": len(arr),
        "values": finite,
    }


def preset_table(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate the runs of one preset: metrics[segment][metric], diagnostics[key], seconds[key]."""
    segments = sorted({seg for r in runs for seg in r["metrics"]})
    metrics = {
        seg: {k: spread([r["metrics"].get(seg, {}).get(k) for r in runs]) for k in (*METRIC_KEYS, "count")}
        for seg in segments
    }
    diag_keys = list(runs[0]["diagnostics"]["summary"]) if runs else []
    diagnostics = {k: spread([r["diagnostics"]["summary"].get(k) for r in runs]) for k in diag_keys}
    seconds = {
        k: spread([r["seconds"].get(k) for r in runs])
        for k in ("train", "train_cpu", "targets", "train_cpu_per_step", "evaluate", "diagnose", "export")
    }
    return {
        "seeds": [r["seed"] for r in runs],
        "metrics": metrics,
        "diagnostics": diagnostics,
        "seconds": seconds,
    }


def paired_deltas(
    runs_by_preset: Mapping[str, Sequence[Mapping[str, Any]]], reference: str = REFERENCE_PRESET
) -> dict[str, Any]:
    """preset -> segment -> metric -> delta vs `reference` over the seeds both have.

    `abs`: spread of the per-seed differences (preset − reference; same seed = same data order,
    init and negatives, so the pairing removes seed noise shared by both); `rel_pct`: 100 × (mean
    preset − mean reference) / mean reference over those seeds; `wins`: seeds where the preset is
    higher.
    """
    ref = {r["seed"]: r for r in runs_by_preset.get(reference, [])}
    out: dict[str, Any] = {}
    for preset, runs in runs_by_preset.items():
        if preset == reference:
            continue
        pairs = [(r, ref[r["seed"]]) for r in runs if r["seed"] in ref]
        if not pairs:
            continue
        per_segment: dict[str, Any] = {}
        for seg in pairs[0][0]["metrics"]:
            per_metric = {}
            for k in METRIC_KEYS:
                a = [p["metrics"][seg].get(k) for p, _ in pairs]
                b = [q["metrics"][seg].get(k) for _, q in pairs]
                ok = [(x, y) for x, y in zip(a, b, strict=True) if _finite(x) and _finite(y)]
                if not ok:
                    continue
                diffs = [x - y for x, y in ok]
                mean_b = float(np.mean([y for _, y in ok]))
                mean_a = float(np.mean([x for x, _ in ok]))
                per_metric[k] = {
                    "abs": spread(diffs),
                    "rel_pct": 100.0 * (mean_a - mean_b) / mean_b if mean_b else None,
                    "wins": int(sum(d > 0 for d in diffs)),
                    "seeds": [p["seed"] for p, _ in pairs],
                }
            per_segment[seg] = per_metric
        out[preset] = per_segment
    return out


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(float(x))


def hr_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """HR@K for K = 1..max_k from 0-based ranks: share of users whose target ranks below K."""
    ranks = np.asarray(ranks)
    counts = np.bincount(np.minimum(ranks, max_k), minlength=max_k + 1)[:max_k]
    return np.cumsum(counts) / max(len(ranks), 1)
