"""Figures for `karma diagnose`: per-layer sink metrics and attention maps (the "barcode" picture).

* `attention_by_layer.png`: one panel per attention metric of `training.diagnostics`, x = layer,
  one line per model (mean over heads, band = min..max over heads; its own marker and line style,
  so overlapping models stay apart), dashed grey = the uniform causal-attention reference; one
  legend below the panels, inside the saved image.
* `attention_maps.png`: head-averaged attention of a few users, rows = query positions, columns =
  key positions (valid positions only, in order: query tokens | history items | [EMB]); grid rows
  = layers (all, or 6 spread from first to last), grid columns = users, with the models side by
  side for each user. Colour is sqrt-scaled (PowerNorm γ=0.5) on one scale for the whole figure,
  so a vertical stripe in one model and its absence in the other compare directly.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from training.diagnostics.result import ModelDiagnostics

MAX_MAP_LAYERS = 6
COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive")
# overlapping models stay distinguishable
STYLES = (("o", "-"), ("s", "-."), ("^", ":"), ("D", "-"), ("v", "--"), ("P", "-."), ("X", ":"), ("*", "-"))


def map_layers(n_layers: int, limit: int = MAX_MAP_LAYERS) -> list[int]:
    """All layers if there are at most `limit`, else `limit` spread evenly, first and last included."""
    if n_layers <= limit:
        return list(range(n_layers))
    return sorted(set(np.linspace(0, n_layers - 1, limit).round().astype(int).tolist()))


# y-axis label (what the number is; every metric is a fraction in [0, 1]) per attention metric
METRIC_UNITS = {
    "emb_top_column_mass": "share of [EMB]'s history attention",
    "rows_top_column_mass": "share of all rows' history attention",
    "emb_entropy": "normalised entropy (1 = uniform)",
    "row_consistency": "mean cosine between rows",
    "emb_first_token_mass": "attention mass on token 0",
    "rows_first_token_mass": "attention mass on token 0",
}
REFERENCE_LABEL = "uniform causal attention (reference)"


def attention_by_layer_figure(results: Sequence[ModelDiagnostics]) -> Figure:
    """The figure of `plot_attention_by_layer` (not saved): the legend sits below the panels, inside the figure."""
    from training.diagnostics.metrics import ATTENTION_METRICS, METRIC_LABELS

    n = len(ATTENTION_METRICS)
    cols = 3
    rows = (n + cols - 1) // cols
    ncol = min(len(results) + 1, 4)
    legend_rows = (len(results) + 1 + ncol - 1) // ncol
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.4 * cols, 3.3 * rows + 0.9 + 0.25 * legend_rows), squeeze=False, layout="constrained"
    )
    for ax, name in zip(axes.flat, ATTENTION_METRICS, strict=False):
        for k, r in enumerate(results):
            values = np.asarray(r.per_layer[name], dtype=float)  # (layers, heads)
            layers = np.arange(values.shape[0])
            colour = COLOURS[k % len(COLOURS)]
            marker, style = STYLES[k % len(STYLES)]
            with np.errstate(all="ignore"):
                mean = np.nanmean(values, axis=1)
                lo, hi = np.nanmin(values, axis=1), np.nanmax(values, axis=1)
            ax.plot(layers, mean, marker=marker, ls=style, ms=max(2, 7 - k), lw=1.5, color=colour, label=r.name)
            ax.fill_between(layers, lo, hi, color=colour, alpha=0.15, lw=0)
        ref = np.asarray(results[0].reference_per_layer[name], dtype=float)
        ax.plot(np.arange(len(ref)), ref, ls="--", color="0.5", lw=1, label=REFERENCE_LABEL)
        ax.set_title(METRIC_LABELS[name], fontsize=10)
        ax.set_xlabel("layer (0 = first)", fontsize=9)
        ax.set_ylabel(METRIC_UNITS.get(name, "fraction (0-1)"), fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=9, frameon=False)
    title = (
        "Attention sink metrics per layer (mean over diagnosed users; line = mean over heads, "
        "band = range over heads; every metric is a fraction in [0, 1])"
    )
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 10)), fontsize=11)
    return fig


def plot_attention_by_layer(results: Sequence[ModelDiagnostics], out_path: Path) -> dict[str, Any]:
    from training.diagnostics.metrics import ATTENTION_METRICS
    from training.plots import save_figure

    save_figure(attention_by_layer_figure(results), out_path, dpi=110)  # its tight box holds the legend
    return {"file": out_path.name, "panels": list(ATTENTION_METRICS), "models": [r.name for r in results]}


def _segment_ticks(ax: Any, n_query: int, n_history: int, history_first: bool = True) -> None:
    """Block boundaries and labels: history, query, [EMB] (or query first, for maps of the older tower)."""
    blocks = (
        [("history", n_history), ("query", n_query)] if history_first else [("query", n_query), ("history", n_history)]
    )
    n = n_query + n_history + 1
    ticks, labels, start = [], [], 0
    for label, size in blocks:
        if size:
            ticks.append(start + (size - 1) / 2)
            labels.append(label)
        start += size
        if 0 < start < n:
            ax.axvline(start - 0.5, color="cyan", lw=0.6, alpha=0.8)
            ax.axhline(start - 0.5, color="cyan", lw=0.6, alpha=0.8)
    ticks.append(n - 1)
    labels.append("EMB")
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_yticks(ticks, labels, fontsize=7, rotation=90, va="center")


def plot_attention_maps(results: Sequence[ModelDiagnostics], out_path: Path) -> dict[str, Any]:
    n_users = min(len(r.maps) for r in results)
    n_layers = min(len(r.maps[0].layers) for r in results) if n_users else 0
    layers = map_layers(n_layers)
    columns = [(u, k) for u in range(n_users) for k in range(len(results))]  # models side by side per user
    n_rows, n_cols = max(1, len(layers)), max(1, len(columns))
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(2.7 * n_cols + 1.2, 2.7 * n_rows + 0.8), squeeze=False, layout="constrained"
    )
    vmax = max((float(m.layers[layer].max()) for r in results for m in r.maps for layer in layers), default=1.0)
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=max(vmax, 1e-6))
    image = None
    for col, (u, k) in enumerate(columns):
        amap = results[k].maps[u]
        for row, layer in enumerate(layers):
            ax = axes[row, col]
            image = ax.imshow(amap.layers[layer], cmap="magma", norm=norm, interpolation="nearest")
            _segment_ticks(ax, amap.n_query, amap.n_history, amap.history_first)
            if row == 0:
                ax.set_title(f"user {amap.user}\n{results[k].name}", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"layer {layer}\nquery position", fontsize=8)
            if row == len(layers) - 1:
                ax.set_xlabel("key position", fontsize=8)
    if image is None:
        for ax in axes.flat:
            ax.axis("off")
        axes[0, 0].text(0.5, 0.5, "no users to draw", ha="center", va="center")
    else:
        shrink = min(0.8, 1.4 / n_rows + 0.1)
        fig.colorbar(image, ax=axes, shrink=shrink, aspect=25, label="attention (head mean, sqrt scale)")
    names = " vs ".join(r.name for r in results)
    title = f"Attention maps (rows = query positions, columns = key positions): {names}"
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 11)), fontsize=9)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return {
        "file": out_path.name,
        "grid": [n_rows, n_cols],
        "layers": layers,
        "users": [results[0].maps[u].user for u in range(n_users)],
        "models": [r.name for r in results],
        "side_by_side": len(results) > 1,
    }
