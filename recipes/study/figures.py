"""The study's PNG figures: HR@K curves, training curves, sink metrics per layer, attention maps.

Everything is drawn from files the runs left on disk (ranks, train logs, diagnostics JSON), so a
report can be redrawn without any model in memory. Legends sit outside the panels and inside the
saved image; overlapping presets differ in colour, marker and line style; L_img is drawn once per
head kind (flow matching and MSE are different losses, on different scales).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from recipes.study.aggregate import hr_curve
from training.diagnostics.plots import COLOURS, STYLES, plot_attention_by_layer, plot_attention_maps
from training.evaluation.report import SEGMENTS
from training.plots import (
    IMG_LOSSES,
    TERM_TITLES,
    TERM_UNITS,
    WARMUP_LABEL,
    mark_stages,
    moving_average,
    read_log,
    read_run_config,
    save_figure,
    stage_bounds,
    visual_loss_kind,
    warmup_label_of,
)

HR_FIGURE = "hr_at_k.png"
CURVES_FIGURE = "training_curves.png"
LAYERS_FIGURE = "attention_by_layer.png"
MAPS_FIGURE = "attention_maps.png"
CURVE_TERMS = ("act", "recon", "gen", "img")


# Baselines: grey, each with its own line style and marker.
BASELINE_STYLES = (("x", ":"), ("+", "--"), ("1", "-."), ("|", (0, (5, 1, 1, 1))))
HR_MARKS = 7  # markers per HR@K curve, spread evenly on the log K axis


def _marker_indices(max_k: int, slot: int, n_slots: int) -> list[int]:
    """Indices (K - 1) of a curve's markers: `HR_MARKS` log-spaced Ks, staggered per curve so that
    curves lying on top of each other still show each one's markers side by side."""
    if max_k < 2:
        return [0]
    step = np.log(max_k) / HR_MARKS
    logs = np.arange(HR_MARKS) * step + step * (slot + 0.5) / max(1, n_slots)
    return sorted({int(min(max_k, max(1, round(k)))) - 1 for k in np.exp(logs)})


def hr_at_k_figure(
    model_ranks: Mapping[str, Sequence[np.ndarray]],
    cold_masks: Mapping[str, np.ndarray] | None,
    max_k: int,
    protocol: str,
) -> Figure:
    """The figure of `plot_hr_at_k` (not saved)."""
    panels = [("all test users", None)]
    if cold_masks:
        panels += [
            ("warm targets (item seen in training)", False),
            ("cold targets (item never seen in training)", True),
        ]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels) + 2.4, 4.2), squeeze=False, layout="constrained"
    )
    ks = np.arange(1, max_k + 1)
    names = list(model_ranks)
    for ax, (title, cold) in zip(axes[0], panels, strict=True):
        n_base = 0
        for i, (name, seeds) in enumerate(model_ranks.items()):
            curves = []
            for ranks in seeds:
                r = np.asarray(ranks)
                if cold is not None and cold_masks is not None:
                    r = r[cold_masks[name] == cold]
                curves.append(hr_curve(r, max_k))
            curves_arr = np.asarray(curves)
            if name.startswith("("):  # a baseline
                colour = "0.4"
                marker, ls = BASELINE_STYLES[n_base % len(BASELINE_STYLES)]
                n_base += 1
            else:
                colour = COLOURS[i % len(COLOURS)]
                marker, ls = STYLES[i % len(STYLES)]
            ax.plot(
                ks, curves_arr.mean(0), color=colour, ls=ls, lw=1.4, alpha=0.9, label=name, marker=marker, ms=5,
                markevery=_marker_indices(max_k, i, len(names)), mfc="none" if i % 2 else colour,
            )  # fmt: skip
            if len(curves_arr) > 1:
                ax.fill_between(ks, curves_arr.min(0), curves_arr.max(0), color=colour, alpha=0.12, lw=0)
        ax.set_xscale("log")
        ax.set_xlabel("K = length of the ranked list (log scale)", fontsize=9)
        ax.set_ylabel("HR@K (share of users, target in top K)", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title="model", title_fontsize=9)
    fig.suptitle("HR@K, full ranking (line = mean over seeds, band = min..max over seeds)", fontsize=11)
    width = int(fig.get_figwidth() * 17)
    fig.text(0.5, -0.01, textwrap.fill(f"protocol: {protocol}", width=width), ha="center", va="top", fontsize=7)
    return fig


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
    Presets differ in colour, marker and line style (markers staggered along K); baselines (names in
    parentheses) are grey; the legend sits outside the panels, the protocol below them.
    """
    return save_figure(hr_at_k_figure(model_ranks, cold_masks, max_k, protocol), out_path)


def _img_kind(name: str, path: Path, img_losses: Mapping[str, str] | None) -> str:
    """'flow' | 'mse': given, else from the run's saved config, else from the name (a preset)."""
    if img_losses and name in img_losses:
        return img_losses[name]
    preset = (read_run_config(path.parent).get("loss") or {}).get("preset")
    return visual_loss_kind(preset or name)


def training_curves_figure(
    logs: Mapping[str, Path], smooth: int = 10, img_losses: Mapping[str, str] | None = None
) -> Figure | None:
    """The figure of `plot_training_curves` (not saved), or None when no log has a curve term."""
    # panel key -> run name -> (steps, values); L_img is split by head: flow matching and MSE never share an axis
    series: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    bounds = (0, 0)
    warmup_label = WARMUP_LABEL
    for name, path in logs.items():
        if not path.exists():
            continue
        records = read_log(path)
        if bounds == (0, 0):  # the runs of a study share the schedule: the first log's stages mark every panel
            bounds, warmup_label = stage_bounds(records), warmup_label_of(read_run_config(path.parent))
        for term in CURVE_TERMS:
            points = [(r["step"], r[term]) for r in records if term in r]
            if points:
                steps, values = np.asarray(points, dtype=float).T
                panel = f"img:{_img_kind(name, path, img_losses)}" if term == "img" else term
                series.setdefault(panel, {})[name] = (steps, moving_average(values, smooth))
    panels = [p for p in (*CURVE_TERMS[:-1], "img:flow", "img:mse") if p in series]
    if not panels:
        return None
    cols = min(len(panels), 3)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows + 1.0), squeeze=False, layout="constrained")
    names = list(logs)
    flat = list(axes.flat)
    warm_end, ramp_end = bounds
    last = max(float(s[-1]) for runs in series.values() for s, _ in runs.values())
    for ax, panel in zip(flat, panels, strict=False):
        mark_stages(ax, warm_end, ramp_end, warmup_label)
        for name, (steps, values) in series[panel].items():
            k = names.index(name)
            marker, ls = STYLES[k % len(STYLES)]
            ax.plot(
                steps, values, lw=1.3, color=COLOURS[k % len(COLOURS)], ls=ls, marker=marker, ms=4,
                markevery=(k % 4 * max(1, len(steps) // 32), max(1, len(steps) // 8)), label=name,
            )  # fmt: skip
        if panel.startswith("img:"):
            head, unit = IMG_LOSSES[panel.split(":", 1)[1]]
            ax.set_title(f"{TERM_TITLES['img']} ({head})", fontsize=10)
        else:
            unit = TERM_UNITS[panel]
            ax.set_title(TERM_TITLES[panel], fontsize=10)
        ax.set_ylabel(unit, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.set_xlim(0.5, last + 0.5)
        ax.grid(alpha=0.3)
    for ax in flat[len(panels) :]:
        ax.axis("off")
    seen: dict[str, Any] = {}  # one legend entry per run and per stage mark, whichever panel has it
    for ax in flat[: len(panels)]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=min(len(seen), 4), fontsize=9)
    smoothing = f"; {smooth}-step trailing moving mean" if smooth > 1 else ""
    fig.suptitle(f"Training curves per preset (first seed{smoothing})", fontsize=11)
    return fig


def plot_training_curves(
    logs: Mapping[str, Path], out_path: Path, smooth: int = 10, img_losses: Mapping[str, str] | None = None
) -> Path | None:
    """One panel per loss term (L_act, L_recon, L_gen, then L_img once per head kind: flow matching and
    MSE are different losses), one line per run; trailing moving mean over `smooth` steps; the warm-up
    stage, the stage change and the action-stage LR ramp are marked. `img_losses`: run name -> 'flow' |
    'mse' (default: from the run's saved config, else the name read as a preset)."""
    fig = training_curves_figure(logs, smooth, img_losses)
    return None if fig is None else save_figure(fig, out_path)


def plot_diagnostics(diagnostics: Sequence, maps_models: Sequence, out_dir: Path) -> dict[str, object]:
    """Sink metrics per layer for every model, and the attention maps of `maps_models` side by side."""
    figures: dict[str, object] = {}
    if diagnostics:
        figures[LAYERS_FIGURE] = plot_attention_by_layer(diagnostics, out_dir / LAYERS_FIGURE)
    if maps_models:
        figures[MAPS_FIGURE] = plot_attention_maps(maps_models, out_dir / MAPS_FIGURE)
    return figures


DELTAS_FIGURE = "deltas.png"


def deltas_figure(deltas: Mapping[str, Mapping[str, Any]], metric: str, title: str) -> Figure | None:
    """Forest plot: one row per segment, one marker per preset, Δmetric vs action-only with its 95% interval."""
    presets = list(deltas)
    segments = [s for s in SEGMENTS if any(s in deltas[p] for p in presets)]
    if not presets or not segments:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(segments) * max(2, len(presets)) / 2 + 1.6), layout="constrained")
    height = 0.8 / len(presets)
    for i, preset in enumerate(presets):
        marker, _ = STYLES[(i + 1) % len(STYLES)]  # slot 0 is action-only's elsewhere in the report
        colour = COLOURS[(i + 1) % len(COLOURS)]
        ys, xs, lo, hi = [], [], [], []
        for j, seg in enumerate(segments):
            entry = deltas[preset].get(seg, {}).get(metric)
            if not entry or entry.get("mean") is None:
                continue
            ys.append(len(segments) - 1 - j + 0.4 - (i + 0.5) * height)
            xs.append(100 * entry["mean"])
            lo.append(100 * (entry["mean"] - entry["lo"]))
            hi.append(100 * (entry["hi"] - entry["mean"]))
        if xs:
            seeds = len(next(iter(deltas[preset].values()))[metric].get("paired_seeds", []))
            ax.errorbar(xs, ys, xerr=[lo, hi], fmt=marker, color=colour, capsize=3, label=_seeds_label(preset, seeds))
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(segments)), [s if s == "all" else f"{s} targets" for s in reversed(segments)])
    ax.set_xlabel(f"Δ{metric} vs action-only, points (×100), 95% bootstrap interval over seeds and users")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, title="preset", title_fontsize=8)
    return fig


def _seeds_label(preset: str, seeds: int) -> str:
    return f"{preset} ({seeds} seeds)" if seeds > 1 else f"{preset} (1 seed: interval over users only)"


def plot_deltas(deltas: Mapping[str, Mapping[str, Any]], out_path: Path, metric: str, title: str) -> bool:
    """Save `deltas_figure`; False when there is nothing to draw."""
    fig = deltas_figure(deltas, metric, title)
    if fig is None:
        return False
    save_figure(fig, out_path)
    return True
