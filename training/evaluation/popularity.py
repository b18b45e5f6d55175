"""Popularity buckets of the catalog: which test targets are head, torso or tail items.

The paper's mechanism (semantic reconstruction keeps content in `h_t`) should matter most where
IDs carry little signal: items seldom or never clicked in training. Buckets split the *warm*
items by their training-target clicks so that each bucket holds about the same share of those
clicks (thirds by default): head = the few most-clicked items that take the first third, torso =
the next third, tail = the long rest, never-clicked warm items included. Cold items (held out of
training) get their own segment and no bucket.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from training.data.split import Split

BUCKETS = ("head", "torso", "tail")
NO_BUCKET = -1  # cold items
BUCKET_RULE = "warm items by training-target clicks, each bucket ~1/3 of those clicks"


def training_clicks(split: Split, n_items: int) -> np.ndarray:
    """(n_items,) int64: how often each item is a training target (validation/test events excluded).

    What the towers are trained to predict; `training.baselines.popularity_counts` also counts each
    user's first event (history only, never a target), which ranks most-popular but buckets nothing.
    """
    return np.bincount(split.seq_items[split.train_pos], minlength=n_items).astype(np.int64)


def popularity_buckets(
    clicks: np.ndarray, cold: np.ndarray | None = None, shares: Sequence[float] = (1 / 3, 1 / 3)
) -> np.ndarray:
    """(n_items,) int8 bucket index into BUCKETS (NO_BUCKET for cold items).

    Warm items sorted by clicks (most first, ties by item index); an item belongs to the first
    bucket whose cumulative click share its *preceding* items have not yet filled, so the most
    clicked item is always head and an item never clicked is always tail.
    """
    clicks = np.asarray(clicks, dtype=np.int64)
    cold = np.zeros(len(clicks), dtype=bool) if cold is None else np.asarray(cold, dtype=bool)
    if len(shares) != len(BUCKETS) - 1 or min(shares) <= 0 or sum(shares) >= 1:
        raise ValueError(f"shares: {len(BUCKETS) - 1} positive shares summing below 1, got {list(shares)}")
    buckets = np.full(len(clicks), NO_BUCKET, dtype=np.int8)
    warm = np.flatnonzero(~cold)
    order = warm[np.lexsort((warm, -clicks[warm]))]
    total = clicks[order].sum()
    if total == 0:
        buckets[warm] = len(BUCKETS) - 1
        return buckets
    before = (np.cumsum(clicks[order]) - clicks[order]) / total  # share taken by more popular items
    edges = np.cumsum(shares)
    bucket_of = np.searchsorted(edges, before, side="right")
    bucket_of[clicks[order] == 0] = len(BUCKETS) - 1
    buckets[order] = bucket_of.astype(np.int8)
    return buckets


def split_buckets(split: Split, n_items: int, cold: np.ndarray | None) -> np.ndarray:
    """popularity_buckets of a split's training clicks (what the study and baselines report)."""
    return popularity_buckets(training_clicks(split, n_items), cold)
