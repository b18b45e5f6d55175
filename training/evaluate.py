"""Evaluate a trained KARMA model (or a checkpoint) under the full-ranking protocol.

The user side goes through the *served* query tower only and the item side through the item
tower only, exactly what export will ship, so these numbers are the numbers the service gives.
The most-popular baseline is printed in the same table, under the same protocol.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from karma.config import KarmaConfig
from training.baselines.popularity import popularity_embeddings
from training.evaluation import eval_targets, evaluate_embeddings, print_metrics_table, protocol_for
from training.setup import Setup, build_setup, embed_items, embed_users

log = logging.getLogger(__name__)


def evaluate_setup(
    setup: Setup,
    which: str = "test",
    print_table: bool = True,
    with_baselines: bool = False,
    title: str | None = None,
) -> dict[str, Any]:
    cfg = setup.config
    targets = eval_targets(setup.split, which, cfg.eval.exclude_history, cfg.eval.max_users)
    items = embed_items(setup)
    users = embed_users(setup, targets.positions, cfg.eval.batch_size)
    cold = setup.dataset.catalog.cold
    results: dict[str, Any] = {
        f"KARMA {cfg.loss.preset}": evaluate_embeddings(users, items, targets, cold, cfg.eval.ks, cfg.eval.batch_size)
    }
    if with_baselines:
        pop_users, pop_items = popularity_embeddings(setup.split, setup.dataset.catalog.n_items, targets.n_users)
        results["most-popular"] = evaluate_embeddings(pop_users, pop_items, targets, cold, cfg.eval.ks)
    protocol = protocol_for(cfg, setup.dataset, which, targets.n_users)
    if print_table:
        print_metrics_table(results, protocol, title=title or f"{which} ({cfg.model.backbone}, {cfg.loss.preset})")
    return {"protocol": protocol, "results": results}


def evaluate_checkpoint(checkpoint: Path, config: KarmaConfig, which: str = "test") -> dict[str, Any]:
    """Rebuild a checkpoint's model on its own data/features and evaluate it."""
    setup = build_setup(config, checkpoint=checkpoint)
    report = evaluate_setup(setup, which=which, print_table=True, with_baselines=True)
    out = checkpoint.parent / f"eval_{which}.json"
    out.write_text(json.dumps(report, indent=2, default=float))
    log.info("wrote %s", out)
    return report
