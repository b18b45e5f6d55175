"""PNG plots of training runs (people look at curves, not JSONL).

`training_curves.png` (written by the trainer into the run folder): one panel per loss term over
optimizer steps, plus the learning rates. The two stages of the recipe are marked on every panel:

* the *semantic warm-up* stage (`stage == "warmup"` in `train_log.jsonl`; the item token learns to
  decode its own text, the backbone at `train.warmup_backbone_lr_scale` x its LR, frozen at 0) is a
  shaded, labelled band;
* the change to the *action* stage is a labelled vertical line;
* the action stage's own linear LR warm-up (`train.warmup_steps`, found in the logged LR) is a
  hatched band.

`L_img` is a flow-matching loss for the `karma` preset and a plain MSE for `img-mse`: the panel says
which (from the run's `checkpoint/karma_config.yaml`, or `img_loss=`), and the study's figure draws
the two on separate panels.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure

LOSS_KEYS = ("total", "warmup", "act", "gen", "recon", "img")  # in the order the stages run
LR_KEYS = ("lr_backbone", "lr_heads")

# What each logged term is, and its unit (the y-axis label).
TERM_TITLES = {
    "total": "total loss L (weighted sum of the stage's terms)",
    "act": "L_act: next-item loss (action)",
    "gen": "L_gen: history-conditioned text generation",
    "recon": "L_recon: item text from h_t",
    "warmup": "L_warmup: item text from its own token",
    "img": "L_img: visual head",
}
TERM_UNITS = {
    "total": "loss (nats; weighted sum)",
    "act": "cross-entropy (nats / target)",
    "gen": "cross-entropy (nats / token)",
    "recon": "cross-entropy (nats / token)",
    "warmup": "cross-entropy (nats / token)",
}
# L_img by visual head (training/model/karma.py PRESETS): flow = conditional flow matching, mse = the ablation.
IMG_LOSSES = {
    "flow": ("flow matching", "velocity MSE (per dim, standardised features)"),
    "mse": ("MSE regression", "feature MSE (per dim, standardised features)"),
}
WARMUP_LABEL = "semantic warm-up stage"
STAGE_LABEL = "warm-up → action stage"
RAMP_LABEL = "action-stage LR warm-up (linear ramp)"
WARMUP_COLOUR = "0.88"
STAGE_COLOUR = "tab:red"


def visual_loss_kind(preset: str | None) -> str:
    """'mse' for the `img-mse` preset, else 'flow' (every other preset with λ_img > 0 uses the flow head)."""
    return "mse" if preset == "img-mse" else "flow"


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's saved effective config (`checkpoint/karma_config.yaml`), or {} when there is none."""
    path = run_dir / "checkpoint" / "karma_config.yaml"
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def read_log(log_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


def stage_bounds(records: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """(last warm-up step, last step of the action stage's LR ramp); 0 where there is none.

    The ramp is read off the logged `lr_heads` of the action stage: the steps before it first
    reaches its peak.
    """
    warm_end = max((int(r["step"]) for r in records if r.get("stage") == "warmup"), default=0)
    action = [(int(r["step"]), float(r["lr_heads"])) for r in records if r.get("stage") == "action" and "lr_heads" in r]
    ramp_end = 0
    if len(action) > 1:
        peak = max(lr for _, lr in action)
        first_peak = next(step for step, lr in action if lr >= peak * (1 - 1e-6))
        if first_peak > action[0][0]:
            ramp_end = first_peak
    return warm_end, ramp_end


def mark_stages(ax: Axes, warm_end: int, ramp_end: int = 0, warmup_label: str = WARMUP_LABEL) -> None:
    """Shade the warm-up band, draw the stage change, hatch the action-stage LR ramp (all labelled)."""
    if warm_end:
        ax.axvspan(0.5, warm_end + 0.5, color=WARMUP_COLOUR, lw=0, zorder=0, label=warmup_label)
        ax.axvline(warm_end + 0.5, color=STAGE_COLOUR, ls="--", lw=1.2, zorder=1, label=STAGE_LABEL)
    if ramp_end > warm_end:
        ax.axvspan(
            warm_end + 0.5, ramp_end + 0.5, facecolor="none", edgecolor="0.65", hatch="///", lw=0, zorder=0,
            label=RAMP_LABEL,
        )  # fmt: skip


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` points (shorter at the start, so it has the length of `values`)."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) < 2:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def warmup_label_of(config: Mapping[str, Any]) -> str:
    """The warm-up band's legend label, with the backbone's LR scale when the run's config is known."""
    scale = (config.get("train") or {}).get("warmup_backbone_lr_scale")
    if scale is None:
        return WARMUP_LABEL
    if float(scale) == 0.0:
        return f"{WARMUP_LABEL} (backbone frozen)"
    return f"{WARMUP_LABEL} (backbone LR × {float(scale):g})"


def training_curves_figure(
    records: Sequence[Mapping[str, Any]],
    title: str = "",
    img_loss: str = "flow",
    warmup_label: str = WARMUP_LABEL,
) -> Figure | None:
    """The figure of `plot_training_curves` (not saved), or None when the log has no loss."""
    keys = [k for k in LOSS_KEYS if any(k in r for r in records)]
    if not keys:
        return None
    has_lr = any(k in r for r in records for k in LR_KEYS)
    n = len(keys) + int(has_lr)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows + 0.9), squeeze=False, layout="constrained")
    warm_end, ramp_end = stage_bounds(records)
    n_steps = max(int(r["step"]) for r in records)
    window = max(1, n_steps // 25)
    flat = list(axes.flat)
    for ax, key in zip(flat, keys, strict=False):
        points = np.asarray([(r["step"], r[key]) for r in records if key in r and r.get("stage") != "eval"], float)
        steps, values = points[:, 0], points[:, 1]
        mark_stages(ax, warm_end, ramp_end, warmup_label)
        if window > 1:
            ax.plot(steps, values, lw=0.8, color="tab:blue", alpha=0.3, label="per step")
            ax.plot(steps, moving_average(values, window), lw=1.6, color="tab:blue", label=f"{window}-step moving mean")
        else:
            ax.plot(steps, values, lw=1.4, color="tab:blue", label="per step")
        if key == "img":
            name, unit = IMG_LOSSES[img_loss]
            ax.set_title(f"{TERM_TITLES[key]} ({name})", fontsize=10)
            ax.set_ylabel(unit, fontsize=9)
        else:
            ax.set_title(TERM_TITLES[key], fontsize=10)
            ax.set_ylabel(TERM_UNITS[key], fontsize=9)
    if has_lr:
        ax = flat[len(keys)]
        mark_stages(ax, warm_end, ramp_end, warmup_label)
        for key, colour, ls in zip(LR_KEYS, ("tab:purple", "tab:green"), ("-", "--"), strict=True):
            points = np.asarray([(r["step"], r[key]) for r in records if key in r], float)
            if len(points):
                ax.plot(points[:, 0], points[:, 1], color=colour, ls=ls, lw=1.4, label=key.replace("lr_", "LR, "))
        lr_handles = [(h, lb) for h, lb in zip(*ax.get_legend_handles_labels(), strict=True) if lb.startswith("LR")]
        ax.set_yscale("log")
        ax.set_title("learning rates (AdamW groups)", fontsize=10)
        ax.set_ylabel("learning rate (log scale)", fontsize=9)
        ax.legend(*zip(*lr_handles, strict=True), fontsize=8, loc="lower right")
    for ax in flat[:n]:
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.set_xlim(0.5, n_steps + 0.5)
        ax.grid(alpha=0.3)
    for ax in flat[n:]:
        ax.axis("off")
    handles, labels = flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), fontsize=9, frameon=False)
    fig.suptitle(title or "Training curves", fontsize=11)
    return fig


def save_figure(fig: Figure, out_path: Path, dpi: int = 100) -> Path:
    """Save as PNG with the bounding box grown to every artist (legends and captions are never cut off),
    palette-quantised to 256 colours (line plots look the same at a third of the size)."""
    from PIL import Image

    out_path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(out_path, format="PNG", optimize=True)
    return out_path


def plot_training_curves(log_path: Path, out_path: Path, img_loss: str | None = None) -> Path | None:
    """One panel per loss term and one for the LRs over optimizer steps, the warm-up stage marked.

    `img_loss` ('flow' | 'mse') names the L_img head; None = read it from the run's saved config.
    """
    if not log_path.exists():
        return None
    records = read_log(log_path)
    config = read_run_config(log_path.parent)
    preset = (config.get("loss") or {}).get("preset")
    kind = img_loss or visual_loss_kind(preset)
    run = log_path.parent.name
    title = f"Training curves of run {run}" + (f" (preset {preset})" if preset else "")
    fig = training_curves_figure(records, title=title, img_loss=kind, warmup_label=warmup_label_of(config))
    if fig is None:
        return None
    return save_figure(fig, out_path)
