"""Command line for longer baseline runs under the common protocol.

python -m training.baselines.runner ml-1m --epochs 200 --threads 1 --json /tmp/baselines-ml-1m.json
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

import torch

from training.baselines import BASELINES, baseline_protocol, run_baselines
from training.baselines.sasrec import SASRecConfig


def main(argv: Sequence[str] | None = None) -> None:
    from karma.config import load_config
    from karma.errors import KarmaError
    from training.data.registry import load_dataset
    from training.data.split import split_dataset
    from training.evaluation.report import print_metrics_table, save_metrics_json

    parser = argparse.ArgumentParser(description="Popularity and SASRec baselines under the full-ranking protocol.")
    parser.add_argument("dataset", help="data set name (synthetic, ml-100k, ml-1m, ...)")
    parser.add_argument("--config", default=None, help="KARMA config file")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--which", default=",".join(BASELINES), help="comma-separated baselines")
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    for field, default in SASRecConfig().__dict__.items():  # SASRec hyper-parameters (see SASRecConfig)
        kind = (float if field.endswith("seconds") else int) if default is None else type(default)  # optional ones
        parser.add_argument(f"--{field.replace('_', '-')}", type=kind, default=default, help=f"SASRec {field}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the metrics here")
    args = parser.parse_args(argv)
    which = [name.strip() for name in args.which.split(",") if name.strip()]
    unknown = sorted(set(which) - set(BASELINES))
    if unknown or not which:  # before any data or model work
        raise KarmaError(f"--which: unknown baseline(s) {unknown or [args.which]}; known: {', '.join(BASELINES)}")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:  # also for evaluation, not just SASRec training
        torch.set_num_threads(args.threads)
    config = load_config(args.config, overrides=args.set)
    sas = SASRecConfig(**{f: getattr(args, f) for f in SASRecConfig().__dict__})
    t0 = time.perf_counter()
    dataset = load_dataset(config, args.dataset, progress=True)
    split = split_dataset(dataset, config.data.min_history, config.data.max_history)
    results = run_baselines(dataset, split, config, which, sas, args.split, args.device)
    protocol = baseline_protocol(dataset, split, config, args.split)
    protocol += f", SASRec {sas}"
    print_metrics_table(results, protocol, title=f"Baselines on {dataset.name} ({time.perf_counter() - t0:.0f}s)")
    for name, res in results.items():
        print(f"{name}: {res['all']['seconds']:.1f}s")
    if args.json:
        save_metrics_json(args.json, results, protocol)


if __name__ == "__main__":
    main()
