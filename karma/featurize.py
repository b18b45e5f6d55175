"""History featurisation shared by training, export parity checks and the service (torch-free).

The query tower sees a user's history as `(B, L, F)` item features plus a `(B, L)` mask: the
newest `max_history` items, oldest first, left-padded so the newest item sits next to [EMB].
Training and serving must build this identically, or the service would score users with a
layout the model never saw; so both call `pad_histories` and `history_features` from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from karma.contracts import (
    HIST_FEATURES_INPUT,
    HIST_MASK_INPUT,
    QUERY_BUCKETS_INPUT,
    QUERY_IDS_INPUT,
    QUERY_MASK_INPUT,
)

if TYPE_CHECKING:
    from karma.tokenization import TextTokenizer


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


def query_encoder_feeds(
    tokenizer: TextTokenizer,
    item_features: np.ndarray,
    queries: Sequence[str],
    histories: Sequence[np.ndarray],
    max_query_tokens: int,
    max_history: int,
    id_buckets: np.ndarray | None = None,
    query_lengths: list[int] | None = None,
) -> dict[str, np.ndarray]:
    """The query encoder's ONNX inputs for a batch of (query, history-item-indices) requests.

    Used by the service, the export comparison/benchmarks and the demo, so every caller feeds the
    graph exactly what training fed the PyTorch tower. `query_lengths` receives each query's token
    count before it was cut to `max_query_tokens`.
    """
    ids, mask = tokenizer.encode(list(queries), max_query_tokens, full_lengths=query_lengths)
    items, hist_mask = pad_histories(histories, max_history)
    feeds = {
        QUERY_IDS_INPUT: ids,
        QUERY_MASK_INPUT: mask,
        HIST_FEATURES_INPUT: history_features(item_features, items),
        HIST_MASK_INPUT: hist_mask,
    }
    if id_buckets is not None:
        feeds[QUERY_BUCKETS_INPUT] = np.ascontiguousarray(id_buckets[items], dtype=np.int64)
    return feeds
