"""The study's PNG figures: HR@K curves, training curves, sink metrics per layer, attention maps.

Everything is drawn from files the runs left on disk (ranks, train logs, diagnostics JSON), so a
report can be redrawn without any model in memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from training.attention_maps import COLOURS, plot_attention_by_layer, plot_attention_maps
from training.study.aggregate import hr_curve

HR_FIGURE = "hr_at_k.png"
CURVES_FIGURE = "training_curves.png"
LAYERS_FIGURE = "attention_by_layer.png"
MAPS_FIGURE = "attention_maps.png"
CURVE_TERMS = ("act", "recon", "gen", "img")


def plot_hr_at_k(
    model_ranks: Mapping[str, Sequence[np.ndarray]],
    cold_masks: Mapping[str, np.ndarray] | None,
    max_k: int,
    out_path: Path,
    protocol: str,
) -> Path:
    """HR@K over K = 1..max_k per model (line = mean over seeds, band = min..max); cold panel if any.

    `model_ranks`: name -> one rank array per seed (all over the same users, in the same order).
    `cold_masks`: name -> bool per user (target is a cold item), or None when there is no cold split.
    Baselines (names in parentheses) are dashed.
    """
    panels = [("all test users", None)]
    if cold_masks:
        panels += [("warm targets", False), ("cold targets", True)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    ks = np.arange(1, max_k + 1)
    for ax, (title, cold) in zip(axes[0], panels, strict=True):
        for i, (name, seeds) in enumerate(model_ranks.items()):
            curves = []
            for ranks in seeds:
                r = np.asarray(ranks)
                if cold is not None and cold_masks is not None:
                    r = r[cold_masks[name] == cold]
                curves.append(hr_curve(r, max_k))
            curves_arr = np.asarray(curves)
            baseline = name.startswith("(")
            colour = "0.45" if baseline else COLOURS[i % len(COLOURS)]
            ls = (":", "--", "-.")[i % 3] if baseline else "-"
            ax.plot(ks, curves_arr.mean(0), color=colour, ls=ls, lw=1.4, label=name)
            if len(curves_arr) > 1:
                ax.fill_between(ks, curves_arr.min(0), curves_arr.max(0), color=colour, alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_xlabel("K (log scale)")
        ax.set_ylabel("HR@K")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle("HR@K, full ranking (line = mean over seeds, band = min..max)", fontsize=10)
    fig.text(0.5, 0.005, protocol, ha="center", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_training_curves(logs: Mapping[str, Path], out_path: Path, smooth: int = 10) -> Path | None:
    """One panel per loss term (L_act, L_recon, L_gen, L_img), one line per run; moving average over `smooth` steps."""
    series: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {t: {} for t in CURVE_TERMS}
    warm_end = 0
    for name, path in logs.items():
        if not path.exists():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        warm_end = max([warm_end, *(r["step"] for r in records if r.get("stage") == "warmup")])
        for term in CURVE_TERMS:
            points = [(r["step"], r[term]) for r in records if term in r]
            if points:
                steps, values = np.asarray(points).T
                if len(values) >= smooth > 1:
                    values = np.convolve(values, np.ones(smooth) / smooth, mode="valid")
                    steps = steps[smooth - 1 :]
                series[term][name] = (steps, values)
    terms = [t for t in CURVE_TERMS if series[t]]
    if not terms:
        return None
    fig, axes = plt.subplots(1, len(terms), figsize=(4.2 * len(terms), 3.4), squeeze=False)
    names = list(logs)
    for ax, term in zip(axes[0], terms, strict=True):
        for name, (steps, values) in series[term].items():
            ax.plot(steps, values, lw=1.2, color=COLOURS[names.index(name) % len(COLOURS)], label=name)
        ax.set_title(f"L_{term} ({smooth}-step moving average)", fontsize=10)
        ax.set_xlabel("optimizer step (warm-up steps first)" if warm_end else "optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_diagnostics(diagnostics: Sequence, maps_models: Sequence, out_dir: Path) -> dict[str, object]:
    """Sink metrics per layer for every model, and the attention maps of `maps_models` side by side."""
    figures: dict[str, object] = {}
    if diagnostics:
        figures[LAYERS_FIGURE] = plot_attention_by_layer(diagnostics, out_dir / LAYERS_FIGURE)
    if maps_models:
        figures[MAPS_FIGURE] = plot_attention_maps(maps_models, out_dir / MAPS_FIGURE)
    return figures
