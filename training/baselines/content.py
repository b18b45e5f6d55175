"""Frozen content-only retriever: no training, the item text embeddings alone.

user u = normalize(mean of the L2-normalised text embeddings of the items in u's model input,
i.e. the newest `max_history` events before the target); item j = its normalised text embedding;
score = cosine. It is what the frozen MiniLM features know before any LLM or action training: a
KARMA tower that does not beat it has not learned anything from the clicks, and one that beats it
only on warm items has learned popularity/co-click structure but not better semantics.

Users with an empty history get a zero vector (every item ties; the pessimistic rule then ranks
the target last), as any model without input would.
"""

from __future__ import annotations

import numpy as np
import torch

from training.data.split import Split
from training.evaluation.protocol import EvalTargets


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def content_embeddings(
    text_features: np.ndarray, split: Split, targets: EvalTargets
) -> tuple[torch.Tensor, torch.Tensor]:
    """((U, T) user vectors, (N, T) item vectors) for `targets`, from (N, T) item text features."""
    items = _unit_rows(np.asarray(text_features, dtype=np.float64))
    lengths = targets.history_end - targets.history_start
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    idx = np.repeat(targets.history_start - offsets[:-1], lengths) + np.arange(offsets[-1])
    history_items = split.seq_items[idx]
    sums = np.zeros((targets.n_users, items.shape[1]))
    np.add.at(sums, np.repeat(np.arange(targets.n_users), lengths), items[history_items])
    users = _unit_rows(sums)
    return torch.from_numpy(users.astype(np.float32)), torch.from_numpy(items.astype(np.float32))
