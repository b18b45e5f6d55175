"""PNG plots of training runs (people look at curves, not JSONL)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LOSS_KEYS = ("total", "act", "gen", "recon", "img", "warmup")


def plot_training_curves(log_path: Path, out_path: Path) -> Path | None:
    """One panel per loss term over optimizer steps (warm-up stage shaded)."""
    if not log_path.exists():
        return None
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    keys = [k for k in LOSS_KEYS if any(k in r for r in records)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    warm_end = max((r["step"] for r in records if r.get("stage") == "warmup"), default=0)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1)
        if warm_end:
            ax.axvspan(0, warm_end, color="0.9", lw=0)
        ax.set_title(f"L_{key}" if key not in {"total", "warmup"} else key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
