"""Leave-one-out chronological split, the protocol every metric in this project is reported under.

Per user, events are ordered by timestamp with ties broken by file order (about half of
MovieLens' consecutive events share a timestamp, so this matters). The last event is the test
target, the second last the validation target, and every earlier event with at least
`min_history` events before it is a training target whose history is the prefix before it.

Everything is stored as positions into one flat, user-grouped sequence (`seq_items`), so a
1M-event split costs a few arrays, and `history(pos)` is a slice.

Cold items (the data set's `Catalog.cold`) may only be test targets: the split refuses data where
one occurs anywhere else, because a cold item seen in training is not cold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from karma.errors import DataValidationError
from training.data.schema import Dataset


@dataclass(frozen=True)
class Split:
    """User-grouped chronological sequences and the target positions of each split."""

    seq_items: np.ndarray  # (n_events,) int32 item index, grouped by user, chronological within
    seq_events: np.ndarray  # (n_events,) int64 original event row of each position (for query, exposed)
    user_offsets: np.ndarray  # (n_users + 1,) int64: user u owns positions [off[u], off[u+1])
    seq_users: np.ndarray  # (n_events,) int32 user of each position
    train_pos: np.ndarray  # int64 positions whose item is a training target
    valid_pos: np.ndarray  # int64, one per user with >= 3 events
    test_pos: np.ndarray  # int64, one per user with >= 2 events
    max_history: int

    def history(self, pos: int) -> np.ndarray:
        """Items before position `pos` of the same user, newest `max_history` kept, oldest first."""
        start = self.user_offsets[self.seq_users[pos]]
        return self.seq_items[max(start, pos - self.max_history) : pos]

    def history_bounds(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised `history`: (start, end) position arrays for many targets at once."""
        starts = self.user_offsets[self.seq_users[positions]]
        return np.maximum(starts, positions - self.max_history), positions

    def fingerprint(self) -> str:
        """Content hash of the split, to prove two runs produced the same one."""
        import hashlib

        digest = hashlib.sha256()
        for array in (
            self.seq_items,
            self.seq_events,
            self.user_offsets,
            self.train_pos,
            self.valid_pos,
            self.test_pos,
        ):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


def chronological_order(user_idx: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Event rows sorted by (user, timestamp, file row); lexsort is stable, so file order breaks ties."""
    rows = np.arange(len(user_idx), dtype=np.int64)
    return np.lexsort((rows, timestamp, user_idx)).astype(np.int64)


def split_dataset(dataset: Dataset, min_history: int = 1, max_history: int = 50) -> Split:
    """Build the leave-one-out split and check the cold-item invariant."""
    inter = dataset.interactions
    order = chronological_order(inter.user_idx, inter.timestamp)
    seq_users = inter.user_idx[order]
    counts = np.bincount(seq_users, minlength=inter.n_users).astype(np.int64)
    offsets = np.zeros(inter.n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    position = np.arange(len(order), dtype=np.int64)
    rank = position - offsets[seq_users]  # index of the event within its user's sequence
    length = counts[seq_users]

    test_mask = (rank == length - 1) & (length >= 2)
    valid_mask = (rank == length - 2) & (length >= 3)
    train_mask = (rank < length - 2) & (rank >= max(min_history, 0))
    seq_items = inter.item_idx[order].astype(np.int32)

    cold = dataset.catalog.cold
    if cold is not None and cold.any():
        misplaced = np.flatnonzero(cold[seq_items] & ~test_mask)
        if len(misplaced):
            pos = int(misplaced[0])
            user = inter.user_ids[seq_users[pos]]
            item = dataset.catalog.item_ids[seq_items[pos]]
            raise DataValidationError(
                dataset.name,
                f"cold item {item!r} occurs before the last event of user {user!r} "
                f"({len(misplaced)} such event(s)); cold items may only be test targets",
            )
    return Split(
        seq_items=seq_items,
        seq_events=order,
        user_offsets=offsets,
        seq_users=seq_users.astype(np.int32),
        train_pos=np.flatnonzero(train_mask),
        valid_pos=np.flatnonzero(valid_mask),
        test_pos=np.flatnonzero(test_mask),
        max_history=max_history,
    )


@dataclass(frozen=True)
class Windows:
    """Training windows over a `Split`: window w is `seq_items[starts[w]:ends[w]]`.

    Its first item is history only; every later position p with `p >= first_target[w]` is a
    target whose history is the window's items before it (`training.model.sequences`).
    """

    starts: np.ndarray  # (W,) int64
    ends: np.ndarray  # (W,) int64, exclusive; ends - 1 is the window's last target
    first_target: np.ndarray  # (W,) int64: earlier positions of the window are history only

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def n_targets(self) -> int:
        return int((self.ends - np.maximum(self.first_target, self.starts + 1)).sum())


def training_windows(split: Split, mode: str, min_history: int = 1) -> Windows:
    """The training examples of `train.targets`.

    every: each user's training positions are cut, from the newest back, into windows of
    `max_history + 1` items that overlap by one, so every training target is supervised exactly
    once per epoch and a window's last target sees a full `max_history` history, as served (SASRec
    and HLLM train on truncated sequences the same way). Targets need >= max(1, min_history)
    earlier events. last: one window per training target, its newest `max_history` events before it.
    """
    train = split.train_pos
    if mode == "last":
        starts = np.maximum(split.user_offsets[split.seq_users[train]], train - split.max_history)
        return Windows(starts.astype(np.int64), (train + 1).astype(np.int64), train.astype(np.int64))
    if mode != "every":
        raise ValueError(f"unknown train.targets {mode!r}; use every or last")
    width = split.max_history + 1
    users = split.seq_users[train]
    last = np.full(len(split.user_offsets) - 1, -1, dtype=np.int64)
    np.maximum.at(last, users, train)
    starts, ends, firsts = [], [], []
    for user in np.flatnonzero(last >= 0):
        begin = int(split.user_offsets[user])
        first = begin + max(1, min_history)
        end = int(last[user]) + 1
        while end - 1 >= first:
            start = max(begin, end - width)
            starts.append(start)
            ends.append(end)
            firsts.append(first)
            end = start + 1
    return Windows(
        np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64), np.asarray(firsts, dtype=np.int64)
    )
