"""Accuracy against training CPU-seconds: KARMA towers and SASRec on the same data, split and machine.

Each KARMA model trains with `train.max_cpu_seconds` = the budget and validates every
`--eval-every` steps (validation CPU is not counted); SASRec trains epoch by epoch under the same
CPU budget, validating after every epoch. The curve is validation HR@10 / HR@200 against training
CPU-seconds; the table adds the test metrics of the final KARMA weights and of SASRec's best
epoch (full ranking over the catalog, history excluded, the project's protocol).

    python benchmarks/bench_recipe_curve.py --dataset ml-1m --budget 1800 \\
        --models tiny smollm2:2 --set data.max_history=50
    python benchmarks/bench_recipe_curve.py --dataset synthetic --budget 300 --models tiny

Writes artifacts/bench/recipe-<dataset>/{results.json, curve.png, table.md}. Run it on an
otherwise idle machine, one job at a time: the figures are CPU-seconds of this process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

log = logging.getLogger("bench_recipe_curve")


def model_overrides(spec: str) -> list[str]:
    """`tiny` | `smollm2:N` (SmolLM2-135M, first N layers, catalog LM softmax) | `hf:<dir>[:N]`."""
    name, _, layers = spec.partition(":")
    if name == "tiny":
        return ["model.backbone=tiny"]
    if name == "smollm2":
        return ["model.backbone=smollm2-135m", f"model.num_layers={int(layers or 4)}", "loss.lm_vocab=catalog"]
    raise SystemExit(f"unknown model spec {spec!r}: use tiny or smollm2:N")


def run_karma(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    from karma.config import load_config
    from training.trainer import METRICS_LOG, run_dir, train

    overrides = [
        f"paths.artifacts={args.artifacts}",
        f"data.name={args.dataset}",
        *model_overrides(spec),
        f"loss.preset={args.preset}",
        f"train.run_name=curve-{args.dataset}-{spec.replace(':', '-')}-{args.preset}",
        f"train.max_cpu_seconds={args.budget}",
        f"train.eval_every={args.eval_every}",
        f"train.steps={args.max_steps}",
        f"train.threads={args.threads}",
        f"seed={args.seed}",
        *args.set,
    ]
    config = load_config(overrides=overrides, environ={})
    started = time.perf_counter()
    result = train(config, progress=not args.quiet)
    records = [json.loads(line) for line in (run_dir(config) / METRICS_LOG).read_text().splitlines() if line]
    curve = [
        {"cpu_seconds": r["cpu_seconds"], "step": r["step"], "targets": r["targets_seen"], **r["valid"]}
        for r in records
        if r.get("stage") == "eval"
    ]
    test = result["metrics"]["results"][f"KARMA {args.preset}"]
    return {
        "model": f"KARMA {args.preset} · {spec}",
        "overrides": overrides,
        "curve": curve,
        "train_cpu_seconds": result["train_cpu_seconds"],
        "wall_seconds": time.perf_counter() - started,
        "targets": result["targets"],
        "targets_per_cpu_second": result["targets_per_cpu_second"],
        "test": test,
        "protocol": result["metrics"]["protocol"],
    }


def run_sasrec(args: argparse.Namespace) -> dict[str, Any]:
    from karma.config import load_config
    from training.baselines import SASRecConfig, sasrec_item_embeddings, sasrec_user_embeddings, train_sasrec
    from training.data.registry import load_dataset
    from training.data.split import split_dataset
    from training.evaluation import eval_targets, evaluate_embeddings

    config = load_config(
        overrides=[f"paths.artifacts={args.artifacts}", f"data.name={args.dataset}", *args.set], environ={}
    )
    dataset = load_dataset(config, progress=not args.quiet)
    split = split_dataset(dataset, config.data.min_history, config.data.max_history)
    cfg = SASRecConfig(
        epochs=10_000,
        max_cpu_seconds=args.budget,
        threads=args.threads,
        seed=args.seed,
        max_len=args.sasrec_max_len,
        patience=args.sasrec_patience,
    )
    started = time.perf_counter()
    model = train_sasrec(dataset, split, cfg, progress=not args.quiet)
    targets = eval_targets(split, "test", config.eval.exclude_history, config.eval.max_users)
    users = sasrec_user_embeddings(model, dataset, split, targets.positions)
    test = evaluate_embeddings(users, sasrec_item_embeddings(model), targets, dataset.catalog.cold, config.eval.ks)
    curve = [
        {
            "cpu_seconds": e["train_cpu_seconds"],
            "epoch": e["epoch"],
            **{k.removeprefix("valid_"): v for k, v in e.items() if k.startswith("valid_")},
        }
        for e in model.train_log
        if "valid_HR@10" in e
    ]
    return {
        "model": f"SASRec (max_len {cfg.max_len}, best epoch {model.best_epoch})",
        "curve": curve,
        "train_cpu_seconds": model.train_log[-1]["train_cpu_seconds"],
        "best_epoch_cpu_seconds": model.train_log[model.best_epoch - 1]["train_cpu_seconds"],
        "wall_seconds": time.perf_counter() - started,
        "test": test,
    }


def plot(results: list[dict[str, Any]], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, metric in zip(axes, ("HR@10", "HR@200"), strict=True):
        for r in results:
            xs = [p["cpu_seconds"] for p in r["curve"]]
            ys = [p[metric] for p in r["curve"]]
            ax.plot(xs, ys, marker="o", ms=3, label=r["model"])
        ax.set_xlabel("training CPU-seconds (validation not counted)")
        ax.set_ylabel(f"validation {metric} (full ranking)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    rows = (len(labels) + 1) // 2
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05 + 0.045 * rows, 1, 0.96))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| model | train CPU s | HR@10 | HR@50 | HR@200 | NDCG@10 | targets/CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["test"]["all"]
        rate = f"{r['targets_per_cpu_second']:.0f}" if "targets_per_cpu_second" in r else ""
        rows.append(
            f"| {r['model']} | {r['train_cpu_seconds']:.0f} | {m['HR@10']:.4f} | {m['HR@50']:.4f} | "
            f"{m['HR@200']:.4f} | {m['NDCG@10']:.4f} | {rate} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--budget", type=float, default=600.0, help="training CPU-seconds per model")
    parser.add_argument("--models", nargs="*", default=["tiny"], help="tiny, smollm2:N (none: SASRec only)")
    parser.add_argument("--preset", default="action-only")
    parser.add_argument("--no-sasrec", action="store_true")
    parser.add_argument("--sasrec-max-len", type=int, default=50)
    parser.add_argument("--sasrec-patience", type=int, default=5, help="stop after N epochs without improvement")
    parser.add_argument("--eval-every", type=int, default=100, help="KARMA steps between validations")
    parser.add_argument("--max-steps", type=int, default=100_000, help="LR schedule length (cosine to 10%%)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="config override for every run")
    parser.add_argument("--artifacts", type=Path, default=REPO_ROOT / "artifacts")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--include", type=Path, action="append", default=[], help="results.json of earlier runs to draw beside these"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from karma.machine import cpu_model

    out = args.out or args.artifacts / "bench" / f"recipe-{args.dataset}"
    out.mkdir(parents=True, exist_ok=True)
    results = [run_karma(spec, args) for spec in args.models]
    if not args.no_sasrec:
        results.append(run_sasrec(args))
    for path in args.include:  # e.g. SASRec trained by another process under the same budget
        results += json.loads(path.read_text())["results"]
    protocol = next((r["protocol"] for r in results if "protocol" in r), "")
    title = (
        f"{args.dataset}: validation accuracy vs training CPU-seconds ({args.threads} thread(s), {cpu_model()}); "
        f"budget {args.budget:.0f} s per model (see each row's CPU s)"
    )
    plot(results, title, out / "curve.png")
    report = {"title": title, "protocol": protocol, "budget_cpu_seconds": args.budget, "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=float))
    text = f"{title}\n\nTest split, {protocol}\n\n{table(results)}\n"
    (out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
