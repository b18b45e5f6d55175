"""History featurisation shared by training, export parity checks and the service (torch-free).

The query tower sees a user's history as `(B, L, F)` item features plus a `(B, L)` mask: the
newest `max_history` items, oldest first, left-padded so the newest item sits next to [EMB].
Training and serving must build this identically, or the service would score users with a
layout the model never saw; so both call `pad_histories` and `history_features` from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad_histories(histories: Sequence[np.ndarray], max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """Item-index rows -> (items (B, L) int64, mask (B, L) int64), newest `max_history` kept, L >= 1."""
    rows = [
        np.asarray(h, dtype=np.int64)[-max_history:] if max_history > 0 else np.zeros(0, np.int64) for h in histories
    ]
    length = max(1, max((len(r) for r in rows), default=0))
    items = np.zeros((len(rows), length), dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        if len(row):
            items[i, length - len(row) :] = row
            mask[i, length - len(row) :] = 1
    return items, mask


def history_features(item_features: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(B, L) item indices -> (B, L, F) float32 features (padding rows read item 0; the mask hides them)."""
    return np.ascontiguousarray(item_features[items], dtype=np.float32)
