"""Training throughput per preset, and the KARMA / action-only training-cost ratio.

Every preset trains the same architecture on the same data for the same number of steps (each
step: `train.batch_size` windows, every position a target); only the loss terms differ, so the
ratio of CPU-seconds per target is the training-time price of the regularizers (serving pays
nothing: export drops the heads). Setup and evaluation are excluded from the timing.

    python benchmarks/bench_training.py                       # tiny backbone, default synthetic
    python benchmarks/bench_training.py --set model.backbone=smollm2-135m --set model.num_layers=4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

PRESETS = ("action-only", "gen", "recon", "karma-text", "karma", "img-mse")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="Action-stage steps timed per preset.")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Config override KEY=VALUE.")
    parser.add_argument("--out", type=Path, default=Path("artifacts/benchmarks/training_throughput.json"))
    args = parser.parse_args()

    import torch

    from karma.config import load_config
    from training.trainer import train

    rows = []
    for preset in args.presets.split(","):  # runs land in artifacts/runs/bench-<preset>
        config = load_config(
            overrides=[
                *args.overrides,
                f"loss.preset={preset}",
                f"train.steps={args.steps}",
                "train.semantic_warmup_steps=0",
                "train.warmup_steps=1",
                f"train.checkpoint_every={10**9}",
                f"train.run_name=bench-{preset}",
            ],
        )
        start = time.perf_counter()
        result = train(config, progress=False, evaluate_at_end=False)
        rows.append(
            {
                "preset": preset,
                "examples_per_second": result["examples_per_second"],
                "targets_per_cpu_second": result["targets_per_cpu_second"],
                "train_seconds": result["train_seconds"],
                "wall_seconds": time.perf_counter() - start,
            }
        )
    base = next((r for r in rows if r["preset"] == "action-only"), None)
    for row in rows:
        row["cost_vs_action_only"] = (
            base["targets_per_cpu_second"] / row["targets_per_cpu_second"] if base else None
        )  # CPU per supervised target, relative
    table = Table(
        title=f"training throughput ({config.model.backbone}, {config.data.name}, batch {config.train.batch_size})"
    )
    for col in ("preset", "windows/s", "targets / CPU s", "s / step", "cost per target vs action-only"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(
            row["preset"],
            f"{row['examples_per_second']:.0f}",
            f"{row['targets_per_cpu_second']:.0f}",
            f"{row['train_seconds'] / args.steps:.3f}",
            f"{row['cost_vs_action_only']:.2f}x" if row["cost_vs_action_only"] else "-",
        )
    Console(width=120).print(table)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
               "threads": config.train.threads, "device": config.train.device}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"machine": machine, "steps": args.steps, "config": config.model_dump(mode="json"), "rows": rows}, indent=2
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
