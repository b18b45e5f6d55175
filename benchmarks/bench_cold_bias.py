"""Are cold items found from their content, or ranked up as a block? A check of a study's cold segment.

    python benchmarks/bench_cold_bias.py studies/r2-synthetic.yaml [--runs action-only-s0,karma-s0] [--k 200]

A cold item has no trained ID row (row 0, a zero vector), so it is scored from content alone; a
warm item's score adds its ID vector, which training pushes *down* for the many items a user did
not click. A cold item can then sit above warm items for everyone, and a cold test target is
"found" because cold items as a group are ranked high, not because its content matches. For each
finished run with a checkpoint this prints, on the study's test targets: the cold share of the
catalog and of the top-K for users with a warm / a cold target, the mean score of cold vs warm
items, and HR@K of cold targets against the whole catalog vs against the cold items only (how
easy the cold items' own competition is). Writes artifacts/benchmarks/cold_bias_<study>.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.report import save_report
from karma.machine import machine
from recipes.study import load_study
from recipes.study.runs import RANKS_FILE
from training.evaluation import eval_targets
from training.setup import build_setup, embed_items, embed_users
from training.trainer import CHECKPOINT_DIR, run_dir


def cold_bias(study_path: Path, runs: list[str] | None, k: int) -> dict[str, Any]:
    study = load_study(study_path)
    names = runs or [study.run_name(p, s) for p, s in study.plan()]
    rows = []
    for name in names:
        preset, _, seed = name.rpartition("-s")
        config = study.run_config(preset, int(seed))
        checkpoint = run_dir(config) / CHECKPOINT_DIR
        if not (checkpoint / "trainer_state.json").exists():
            print(f"{name}: no checkpoint here, skipped")
            continue
        setup = build_setup(config, checkpoint=checkpoint, progress=False)
        cold = np.asarray(setup.dataset.catalog.cold, dtype=bool)
        if not cold.any():
            raise SystemExit(f"{study_path}: the data set has no cold items")
        ev = config.eval
        targets = eval_targets(setup.split, "test", ev.exclude_history, ev.max_users)
        users = embed_users(setup, targets.positions, ev.batch_size)
        items = embed_items(setup)
        scores = users @ items.T
        top = torch.topk(scores, k, dim=1).indices.numpy()
        cold_target = cold[targets.items]
        share = cold[top].mean(axis=1)
        saved = np.load(run_dir(config) / RANKS_FILE)  # the ranks the study reported (history excluded)
        if not np.array_equal(saved["target_items"], targets.items):
            raise SystemExit(f"{name}: {RANKS_FILE} ranks other targets than the study's test split")
        ranks = saved["ranks"]
        target_scores = scores[torch.arange(len(scores)), torch.from_numpy(np.asarray(targets.items))]
        among_cold = (scores[:, torch.from_numpy(cold)] >= target_scores[:, None]).sum(dim=1).numpy() - 1
        s = scores.numpy()
        rows.append(
            {
                "run": name,
                "cold_share_catalog": float(cold.mean()),
                "cold_share_topk_warm_users": float(share[~cold_target].mean()),
                "cold_share_topk_cold_users": float(share[cold_target].mean()),
                "mean_score_cold_items": float(s[:, cold].mean()),
                "mean_score_warm_items": float(s[:, ~cold].mean()),
                "cold_hr_all_items": float((ranks[cold_target] < k).mean()),
                "cold_hr_among_cold_items": float((among_cold[cold_target] < k).mean()),
                "users_warm_cold": [int((~cold_target).sum()), int(cold_target.sum())],
            }
        )
        del setup
    return {"study": study.name, "k": k, "rows": rows, "machine": machine()}


def print_table(report: dict[str, Any]) -> None:
    k = report["k"]
    print(f"study {report['study']}, test split, top-{k} over the whole catalog (history excluded in HR only)")
    header = (
        f"{'run':<18} {'cold/catalog':>12} {'cold/top-K warm u':>17} {'cold/top-K cold u':>17} "
        f"{'score cold':>10} {'score warm':>10} {'cold HR@K':>9} {'cold HR@K vs cold only':>22}"
    )
    print(header)
    for r in report["rows"]:
        print(
            f"{r['run']:<18} {r['cold_share_catalog']:>12.4f} {r['cold_share_topk_warm_users']:>17.4f} "
            f"{r['cold_share_topk_cold_users']:>17.4f} {r['mean_score_cold_items']:>10.3f} "
            f"{r['mean_score_warm_items']:>10.3f} {r['cold_hr_all_items']:>9.4f} {r['cold_hr_among_cold_items']:>22.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="study file whose runs to check (e.g. studies/r2-synthetic.yaml)")
    parser.add_argument("--runs", default=None, help="comma-separated run names (default: every planned run here)")
    parser.add_argument("--k", type=int, default=200, help="cut-off K (default 200)")
    args = parser.parse_args()
    report = cold_bias(args.study, args.runs.split(",") if args.runs else None, args.k)
    print_table(report)
    save_report(report, Path("artifacts") / "benchmarks" / f"cold_bias_{report['study']}.json")


if __name__ == "__main__":
    main()
