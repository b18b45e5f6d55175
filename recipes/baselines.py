"""`karma baselines`: the baselines under the common full-ranking protocol, from the command line.

karma baselines ml-1m --epochs 200 --threads 1 --json /tmp/baselines-ml-1m.json
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from training.baselines import BASELINES, baseline_protocol, run_baselines
from training.baselines_config import SASRecConfig


def run_baselines_command(
    dataset: str,
    config: Path | None,
    set_: list[str] | None,
    which: str,
    split: str,
    device: str,
    json_out: Path | None,
    **sasrec_flags: Any,
) -> None:
    """`karma baselines`: validate everything, then load the data, run the baselines, print and save."""
    from karma.config import load_config
    from karma.errors import KarmaError
    from training.data.registry import load_dataset
    from training.data.split import split_dataset
    from training.evaluation.report import print_metrics_table, save_metrics_json

    names = [name.strip() for name in which.split(",") if name.strip()]
    unknown = sorted(set(names) - set(BASELINES))
    if unknown or not names:  # before any data or model work
        raise KarmaError(f"--which: unknown baseline(s) {unknown or [which]}; known: {', '.join(BASELINES)}")
    if split not in ("valid", "test"):
        raise KarmaError(f"--split must be 'valid' or 'test', got {split!r}")
    sas = SASRecConfig(
        **{name.removeprefix("sasrec_"): getattr(value, "value", value) for name, value in sasrec_flags.items()}
    )  # a choice flag (e.g. --loss) arrives as an Enum member
    cfg = load_config(config, overrides=set_ or [])

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if sas.threads:  # also for evaluation, not just SASRec training
        torch.set_num_threads(sas.threads)
    t0 = time.perf_counter()
    data = load_dataset(cfg, dataset, progress=True)
    parts = split_dataset(data, cfg.data.min_history, cfg.data.max_history)
    results = run_baselines(data, parts, cfg, names, sas, split, device)
    protocol = baseline_protocol(data, parts, cfg, split)
    protocol += f", SASRec {sas}"
    print_metrics_table(results, protocol, title=f"Baselines on {data.name} ({time.perf_counter() - t0:.0f}s)")
    for name, res in results.items():
        print(f"{name}: {res['all']['seconds']:.1f}s")
    if json_out is not None:
        save_metrics_json(json_out, results, protocol)
