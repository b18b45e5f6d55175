"""Reference baselines, evaluated with the same full-ranking code as the KARMA towers.

* most-popular (`popularity`): one global score per item, its training click count;
* SASRec (`sasrec`): ID-only causal self-attention, full-softmax CE (default) or the original BCE;
* frozen content (`content`): mean of the history items' frozen text embeddings (MiniLM by
  default) against the items' own, no training (`training.baselines.content`).

`run_baselines(dataset, split, config)` trains/evaluates them and returns
{name: evaluate_embeddings() dict}; `karma baselines <data set>` prints a table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from karma.config import KarmaConfig
from karma.errors import KarmaError
from training.baselines.content import content_embeddings
from training.baselines.popularity import popularity_counts, popularity_embeddings, training_event_mask
from training.baselines.sasrec import (
    SASRec,
    SASRecConfig,
    sasrec_item_embeddings,
    sasrec_user_embeddings,
    train_sasrec,
    training_windows,
)
from training.baselines_config import BASELINES
from training.data.schema import Dataset
from training.data.split import Split
from training.evaluation.protocol import EvalTargets, eval_targets, protocol_for
from training.evaluation.report import evaluate_embeddings

log = logging.getLogger(__name__)


__all__ = [
    "BASELINES",
    "SASRec",
    "SASRecConfig",
    "baseline_embeddings",
    "baseline_protocol",
    "content_embeddings",
    "popularity_counts",
    "popularity_embeddings",
    "run_baselines",
    "sasrec_item_embeddings",
    "sasrec_user_embeddings",
    "train_sasrec",
    "training_event_mask",
    "training_windows",
]


def baseline_protocol(dataset: Dataset, split: Split, config: KarmaConfig, which: str = "test") -> str:
    """The protocol line for `run_baselines(..., which=which)` with this config."""
    targets = eval_targets(split, which, config.eval.exclude_history, config.eval.max_users)  # type: ignore[arg-type]
    return protocol_for(config, dataset, which, targets.n_users, model_input=None)


def baseline_embeddings(
    name: str,
    dataset: Dataset,
    split: Split,
    config: KarmaConfig,
    targets: EvalTargets,
    sasrec_cfg: SASRecConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(user embeddings for `targets`, item embeddings) of one baseline; trains it if it learns."""
    if name == "popular":
        _, items = popularity_embeddings(split, dataset.catalog.n_items, 1)
        return torch.ones(targets.n_users, 1, dtype=items.dtype), items
    if name == "content":
        from training.features import build_item_features

        features = build_item_features(dataset.catalog, config, progress=progress)
        text_blocks = [b.name for b in features.layout.blocks if b.name.startswith("text:")]
        if not text_blocks:
            raise ValueError(f"data set {dataset.name}: the content baseline needs a text feature block")
        return content_embeddings(features.block(text_blocks[0]), split, targets)
    if name == "sasrec":
        cfg = sasrec_cfg or SASRecConfig(seed=config.seed)
        model = train_sasrec(dataset, split, cfg, device=device, progress=progress)
        return sasrec_user_embeddings(model, dataset, split, targets.positions), sasrec_item_embeddings(model)
    raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")


def run_baselines(
    dataset: Dataset,
    split: Split,
    config: KarmaConfig,
    which: Sequence[str] = BASELINES,
    sasrec_cfg: SASRecConfig | None = None,
    eval_split: str = "test",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, dict[str, dict[str, float]]]:
    """{baseline name: evaluate_embeddings() dict} on `eval_split`, with config.eval's protocol.

    SASRec is seeded with `config.seed` unless `sasrec_cfg` is given. Each result's "all" segment
    also carries `seconds` (training + evaluation wall time).
    """
    unknown = set(which) - set(BASELINES)
    if unknown:
        raise KarmaError(f"unknown baseline(s) {sorted(unknown)}; known: {', '.join(BASELINES)}")
    ev = config.eval
    targets = eval_targets(split, eval_split, ev.exclude_history, ev.max_users)  # type: ignore[arg-type]
    cold = dataset.catalog.cold
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name in which:
        t0 = time.perf_counter()
        users, items = baseline_embeddings(name, dataset, split, config, targets, sasrec_cfg, device, progress)
        results[name] = evaluate_embeddings(users, items, targets, cold, ev.ks, batch_size=ev.batch_size)
        results[name]["all"]["seconds"] = time.perf_counter() - t0
        log.info("baseline %s on %s: %s", name, dataset.name, results[name]["all"])
    return results
