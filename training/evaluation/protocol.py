"""Which users are evaluated, on which target, with which items excluded: the evaluation protocol.

Leave-one-out (see `training.data.split`): per user, chronologically, the last event is the test
target and the second last the validation target. Every metric is a full ranking over the whole
catalog.

Two different "histories" are involved, on purpose:

* the **model input** is the newest `max_history` events before the target (`history_start`,
  `history_end`; the same truncation `Split.history_bounds` gives training), and
* the **exclusion list** is the user's *full* history before the target, not the truncated one.
  An item the user interacted with 300 events ago is still one they have already seen; whether a
  model reads that far back is a property of the model, not of the protocol, so it must not change
  which items are candidates. (For a test target, the full history includes the validation target.)

The target itself is never excluded, even if the user interacted with it before (re-consumption).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from training.data.split import Split

if TYPE_CHECKING:
    from karma.config import KarmaConfig
    from training.data.schema import Dataset

Which = Literal["valid", "test"]

_SPLIT_DESCRIPTION = {
    "test": "leave-one-out, last event per user",
    "valid": "leave-one-out, second-last event per user",
}


@dataclass(frozen=True)
class EvalTargets:
    """One evaluation example per user: target position and item, model input bounds, exclusion CSR."""

    which: str  # "valid" | "test"
    positions: np.ndarray  # (U,) int64 positions into split.seq_items of each target
    users: np.ndarray  # (U,) int64 user index of each target
    items: np.ndarray  # (U,) int64 target item index
    history_start: np.ndarray  # (U,) int64: model input = seq_items[history_start:history_end] (truncated)
    history_end: np.ndarray  # (U,) int64 (== positions)
    exclude_offsets: np.ndarray | None  # (U + 1,) int64 CSR offsets into exclude_items, None = no exclusion
    exclude_items: np.ndarray | None  # int64 items of each user's FULL history before the target
    exclude_history: bool
    max_history: int

    @property
    def n_users(self) -> int:
        return len(self.positions)


def full_history_csr(split: Split, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, items): every item of the user's events strictly before each position (untruncated)."""
    positions = np.asarray(positions, dtype=np.int64)
    starts = split.user_offsets[split.seq_users[positions]].astype(np.int64)
    lengths = positions - starts
    offsets = np.zeros(len(positions) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # Concatenated ranges [start_u, pos_u) without a Python loop.
    idx = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
    return offsets, split.seq_items[idx].astype(np.int64)


def eval_targets(
    split: Split, which: Which = "test", exclude_history: bool = True, max_users: int | None = None
) -> EvalTargets:
    """Targets of the `valid` or `test` split; `max_users` keeps the first N users (by user index)."""
    if which not in _SPLIT_DESCRIPTION:
        raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
    positions = np.asarray(split.test_pos if which == "test" else split.valid_pos, dtype=np.int64)
    if max_users is not None:
        positions = positions[: int(max_users)]
    start, end = split.history_bounds(positions)
    offsets = items = None
    if exclude_history:
        offsets, items = full_history_csr(split, positions)
    return EvalTargets(
        which=which,
        positions=positions,
        users=split.seq_users[positions].astype(np.int64),
        items=split.seq_items[positions].astype(np.int64),
        history_start=np.asarray(start, dtype=np.int64),
        history_end=np.asarray(end, dtype=np.int64),
        exclude_offsets=offsets,
        exclude_items=items,
        exclude_history=exclude_history,
        max_history=split.max_history,
    )


def protocol_text(
    dataset_name: str,
    which: str,
    n_users: int,
    ks: Sequence[int],
    exclude_history: bool,
    max_history: int | None = None,
    n_items: int | None = None,
) -> str:
    """One line that says exactly what a metric means; print it beside every number.

    e.g. "dataset=ml-1m, split=test (leave-one-out, last event per user), full ranking over all
    3883 catalog items, history excluded, K=10/50/200, users=6040, model input=newest 50 events".
    """
    split_part = f"split={which} ({_SPLIT_DESCRIPTION.get(which, which)})"
    items_part = f"full ranking over all {n_items} catalog items" if n_items is not None else "full ranking"
    excl = "history excluded (full history, target kept)" if exclude_history else "history not excluded"
    ks_part = "K=" + "/".join(str(k) for k in sorted(set(int(k) for k in ks)))
    parts = [f"dataset={dataset_name}", split_part, items_part, excl, ks_part, f"users={n_users}"]
    if max_history is not None:
        parts.append(f"model input=newest {max_history} events")
    parts.append("ties pessimistic")
    return ", ".join(parts)


def protocol_for(
    config: KarmaConfig, dataset: Dataset, which: str, n_users: int, model_input: int | bool | None = True
) -> str:
    """`protocol_text` from a run's config and data set (K, history exclusion, catalog size): one call for every
    table. `model_input`: True = the config's data.max_history, an int = another model's window (SASRec's
    max_len), None/False = no model-input clause (baselines that read no window)."""
    history = config.data.max_history if model_input is True else (model_input or None)
    return protocol_text(
        dataset.name,
        which,
        n_users,
        config.eval.ks,
        config.eval.exclude_history,
        history,
        dataset.catalog.n_items,
    )
