"""Most-popular baseline: every user gets the same scores, the item's training click count.

"Training events" are every event that is not a validation or a test target, i.e. for each user
all events strictly before their validation target (or before the test target for users too
short to have one). That includes each user's first event, which `Split.train_pos` leaves out
only because it has no history to be predicted from; as a popularity signal it is as good as any
other click. Neither validation nor test targets are counted, so the same scores serve both
splits without leaking either.

It is evaluated with the common ranking code as a 1-d "two-tower" model (user = 1, item = count),
so exclusion and the pessimistic tie rule apply exactly as for every other model. Cold items have
count 0 and tie with every other unseen item, so popularity never retrieves them.
"""

from __future__ import annotations

import numpy as np
import torch

from training.data.split import Split


def training_event_mask(split: Split) -> np.ndarray:
    """(n_events,) bool: positions that are neither validation nor test targets."""
    mask = np.ones(len(split.seq_items), dtype=bool)
    mask[split.valid_pos] = False
    mask[split.test_pos] = False
    return mask


def popularity_counts(split: Split, n_items: int) -> np.ndarray:
    """(n_items,) int64 number of training events per item."""
    return np.bincount(split.seq_items[training_event_mask(split)], minlength=n_items).astype(np.int64)


def popularity_embeddings(split: Split, n_items: int, n_users: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((U, 1) ones, (N, 1) counts): inner product = the item's popularity, the same for every user."""
    counts = torch.from_numpy(popularity_counts(split, n_items).astype(np.float64)).unsqueeze(1)
    return torch.ones(n_users, 1, dtype=torch.float64), counts
