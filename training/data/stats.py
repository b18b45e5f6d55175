"""Descriptive statistics of a data set (`karma data stats NAME`).

They answer the questions one asks before training on a data set: how big, how long are the
histories, how concentrated is popularity (how tempting is an ID-memorising shortcut), and how
many cold items will the test set probe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from training.data.schema import Dataset

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


@dataclass(frozen=True)
class DatasetStats:
    name: str
    users: int
    events: int
    catalog_items: int
    items_with_events: int
    cold_items: int
    cold_test_targets: int
    events_per_user_min: int
    events_per_user_mean: float
    events_per_user_max: int
    events_per_user_quantiles: dict[str, float]
    top1pct_items_event_share: float  # share of events on the top 1% of items with events
    with_query: bool
    with_exposed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def compute_stats(dataset: Dataset) -> DatasetStats:
    inter = dataset.interactions
    per_user = np.bincount(inter.user_idx, minlength=inter.n_users)
    per_item = np.bincount(inter.item_idx, minlength=dataset.catalog.n_items)
    active_items = np.sort(per_item[per_item > 0])[::-1]
    top = max(1, int(np.ceil(0.01 * len(active_items))))
    cold = dataset.catalog.cold
    return DatasetStats(
        name=dataset.name,
        users=inter.n_users,
        events=inter.n_events,
        catalog_items=dataset.catalog.n_items,
        items_with_events=len(active_items),
        cold_items=int(cold.sum()) if cold is not None else 0,
        cold_test_targets=int(cold[inter.item_idx].sum()) if cold is not None else 0,
        events_per_user_min=int(per_user.min()),
        events_per_user_mean=float(per_user.mean()),
        events_per_user_max=int(per_user.max()),
        events_per_user_quantiles={f"p{int(q * 100)}": float(np.quantile(per_user, q)) for q in QUANTILES},
        top1pct_items_event_share=float(active_items[:top].sum() / max(1, inter.n_events)),
        with_query=inter.query is not None,
        with_exposed=inter.exposed_offsets is not None,
    )
