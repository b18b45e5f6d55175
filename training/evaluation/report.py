"""Evaluate embeddings under the protocol, split warm/cold, and print or save the numbers."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from karma.jsonable import to_jsonable
from training.evaluation.metrics import ArrayLike, metric_names, metrics_from_ranks, rank_targets
from training.evaluation.popularity import BUCKETS
from training.evaluation.protocol import EvalTargets

SEGMENTS = ("all", "warm", "cold", *BUCKETS)


def evaluate_embeddings(
    user_emb: ArrayLike,
    item_emb: ArrayLike,
    targets: EvalTargets,
    cold_mask: np.ndarray | None,
    ks: Sequence[int],
    batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """Metrics of a two-tower model: row u of `user_emb` is the embedding for `targets` example u.

    Returns {"all": metrics} and, when `cold_mask` marks any cold item, also "warm" and "cold"
    (examples split by whether the *target* item is cold; an empty segment has count 0 and NaN
    metrics).
    """
    if len(user_emb) != targets.n_users:
        raise ValueError(f"{len(user_emb)} user embeddings for {targets.n_users} evaluation targets")
    ranks = rank_targets(
        user_emb,
        item_emb,
        targets.items,
        targets.exclude_offsets,
        targets.exclude_items,
        batch_size=batch_size,
    )
    return segment_metrics(ranks, targets.items, cold_mask, ks)


def segment_metrics(
    ranks: torch.Tensor,
    target_items: np.ndarray,
    cold_mask: np.ndarray | None,
    ks: Sequence[int],
    item_buckets: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """{"all": ..., ["warm": ..., "cold": ...], ["head": ..., "torso": ..., "tail": ...]} from ranks.

    `item_buckets` (from `training.evaluation.popularity`) adds one segment per popularity bucket
    of the target item; cold targets belong to none of them.
    """
    ranks = torch.as_tensor(ranks)
    results = {"all": metrics_from_ranks(ranks, ks)}
    if cold_mask is not None and np.asarray(cold_mask).any():
        is_cold = torch.from_numpy(np.asarray(cold_mask, dtype=bool)[np.asarray(target_items)])
        results["warm"] = metrics_from_ranks(ranks[~is_cold], ks)
        results["cold"] = metrics_from_ranks(ranks[is_cold], ks)
    if item_buckets is not None:
        of_target = np.asarray(item_buckets)[np.asarray(target_items)]
        for b, name in enumerate(BUCKETS):
            results[name] = metrics_from_ranks(ranks[torch.from_numpy(of_target == b)], ks)
    return results


def _ks_of(results: Mapping[str, Mapping[str, Any]]) -> list[int]:
    ks: set[int] = set()
    for segments in results.values():
        for metrics in _segments(segments).values():
            ks.update(int(name.split("@")[1]) for name in metrics if name.startswith("HR@"))
    return sorted(ks)


def _segments(value: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    """Accept both an evaluate_embeddings() dict and a bare metrics dict."""
    if "count" in value:
        return {"all": value}
    return value


def _fmt(x: Any) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def print_metrics_table(
    results: Mapping[str, Mapping[str, Any]],
    protocol: str,
    title: str = "Full-ranking evaluation",
    console: Console | None = None,
) -> None:
    """Rich table: one row per model and segment, columns HR@K, NDCG@K, MRR, users; protocol under it.

    `results` maps a model name to an `evaluate_embeddings()` dict (or a bare metrics dict).
    """
    columns = metric_names(_ks_of(results))
    widths = [max([5, *(len(str(m)) for m in results)]), 7, *(max(len(c), 6) for c in columns), 7]
    needed = sum(w + 3 for w in widths) + 1
    if console is None:
        console = Console()
        if console.width < needed:  # never squash the numbers (rich defaults to 80 columns off a terminal)
            console = Console(width=needed)
    table = Table(title=title)
    table.add_column("model", style="bold", no_wrap=True, min_width=widths[0])
    table.add_column("segment", no_wrap=True)
    for name in columns:
        table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
    table.add_column("users", justify="right", no_wrap=True)
    for model, segments in results.items():
        for segment, metrics in _segments(segments).items():
            table.add_row(model, segment, *(_fmt(metrics.get(c)) for c in columns), str(int(metrics.get("count", 0))))
    console.print(table)
    console.print(f"[dim]protocol:[/dim] {escape(protocol)}", soft_wrap=True, markup=True, highlight=False)


def save_metrics_json(path: Path | str, results: Mapping[str, Any], protocol: str) -> Path:
    """Write {"protocol": ..., "results": ...} as strict JSON (NaN -> null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"protocol": protocol, "results": to_jsonable(results)}
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path
