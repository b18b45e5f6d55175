"""The diagnostics table, its protocol line and the JSON report."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import training.diagnostics.metrics as metric_definitions
from training.diagnostics.metrics import ATTENTION_METRICS, JACCARD_K, METRIC_LABELS
from training.diagnostics.result import ModelDiagnostics

log = logging.getLogger("training.diagnostics")

# ---- reports ---------------------------------------------------------------------------------


def protocol_line(results: Sequence[ModelDiagnostics]) -> str:
    p = results[0].protocol
    hist = p["history_length"]
    parts = [
        f"dataset={p['dataset']}",
        f"split={p['split']}",
        f"users={p['users']}",
        f"history length={hist['mean']:.1f} mean ({hist['min']}-{hist['max']}), newest {p['max_history']} kept",
        f"top-{JACCARD_K} over all {p['n_items']} items"
        + (", history excluded (target kept)" if p["exclude_history"] else ""),
        f"categories={p['category_field'] or 'n/a'}",
        "attention: mean over users; reference = uniform causal attention / random items",
    ]
    if len({r.protocol["split_fingerprint"] for r in results}) > 1:
        parts.append("WARNING: the models were trained on different data (different users)")
    return ", ".join(parts)


def _fmt(value: float, name: str) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}" if name == "effective_rank" else f"{value:.4f}"


def _row_label(key: str) -> tuple[str, str]:
    base, _, suffix = key.partition(" · ")
    label = METRIC_LABELS.get(base, base)
    return (f"{label} · {suffix}" if suffix else label), base


def print_table(results: Sequence[ModelDiagnostics], console: Any = None) -> None:
    """Rich table: rows = metrics, columns = models + reference; protocol and notes below."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(width=max(120, 48 + 26 * (len(results) + 1)))
    table = Table(title="Collapse diagnostics")
    table.add_column("metric", style="bold", no_wrap=True)
    for r in results:
        table.add_column(escape(r.name), justify="right", no_wrap=True)
    table.add_column("reference", justify="right", style="dim", no_wrap=True)
    summaries = [r.summary() for r in results]
    reference = results[0].reference_summary()
    for key in summaries[0]:
        label, base = _row_label(key)
        cells = []
        for r, s in zip(results, summaries, strict=True):
            cell = _fmt(s[key], base)
            if base.startswith("recon_") and not r.recon_trained:
                cell += " (untrained head)"
            cells.append(cell)
        table.add_row(escape(label), *cells, _fmt(reference.get(key, math.nan), base))
    console.print(table)
    console.print(f"[dim]protocol:[/dim] {escape(protocol_line(results))}", soft_wrap=True, highlight=False)
    for r in results:
        for note in r.notes:
            console.print(f"[dim]note ({escape(r.name)}):[/dim] {escape(note)}", soft_wrap=True, highlight=False)


def report_dict(results: Sequence[ModelDiagnostics], figures: Mapping[str, Any]) -> dict[str, Any]:
    models = {}
    for r in results:
        models[r.name] = {
            "checkpoint": r.checkpoint,
            "preset": r.preset,
            "recon_trained": r.recon_trained,
            "notes": r.notes,
            "protocol": r.protocol,
            "summary": r.summary(),
            "reference": r.reference_summary(),
            "per_layer": {name: r.per_layer[name] for name in ATTENTION_METRICS},  # [layer][head]
            "map_users": [m.user for m in r.maps],
        }
    definitions = (metric_definitions.__doc__ or "").split("Notation", 1)[-1]
    return {
        "protocol": protocol_line(results),
        "definitions": "Notation" + definitions,
        "models": models,
        "figures": dict(figures),
    }
