"""The leave-one-out split: ordering, tie-breaking, prefixes, determinism, the cold-item invariant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from karma.config import KarmaConfig
from karma.errors import DataValidationError
from training.data.registry import load_dataset
from training.data.schema import Catalog, Dataset, Interactions
from training.data.split import split_dataset, training_windows


def toy_dataset(
    users: list[str], items: list[int], times: list[int], n_items: int = 10, cold: list[int] | None = None
) -> Dataset:
    catalog_ids = [f"i{k}" for k in range(n_items)]
    flags = np.zeros(n_items, dtype=bool)
    flags[cold or []] = True
    catalog = Catalog(
        items=pd.DataFrame({"item_id": catalog_ids, "title": catalog_ids}), text_fields=("title",), cold=flags
    )
    codes, uniques = pd.factorize(pd.Series(users), sort=False)
    inter = Interactions(
        user_ids=np.asarray(uniques, dtype=object),
        user_idx=codes.astype(np.int32),
        item_idx=np.asarray(items, dtype=np.int32),
        timestamp=np.asarray(times, dtype=np.int64),
    )
    return Dataset(name="toy", catalog=catalog, interactions=inter)


def test_chronological_with_file_order_ties() -> None:
    # u1's events out of file order in time; items 3 and 4 share a timestamp (file order 3 before 4).
    ds = toy_dataset(["u1", "u2", "u1", "u1", "u1", "u2", "u1"], [5, 9, 3, 4, 1, 8, 6], [20, 1, 10, 10, 5, 2, 30])
    split = split_dataset(ds, min_history=1, max_history=50)
    u1 = split.seq_items[split.user_offsets[0] : split.user_offsets[1]].tolist()
    assert u1 == [1, 3, 4, 5, 6]
    assert split.seq_items[split.test_pos].tolist() == [6, 8]  # last event of each user
    assert split.seq_items[split.valid_pos].tolist() == [5]  # u2 has only 2 events: no validation target
    assert split.seq_items[split.train_pos].tolist() == [3, 4]  # prefixes with >= 1 history event
    assert split.history(int(split.test_pos[0])).tolist() == [1, 3, 4, 5]
    assert split.history(int(split.train_pos[1])).tolist() == [1, 3]


def test_min_and_max_history() -> None:
    ds = toy_dataset(["u"] * 6, [0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6])
    split = split_dataset(ds, min_history=2, max_history=2)
    assert split.seq_items[split.train_pos].tolist() == [2, 3]
    assert split.history(int(split.test_pos[0])).tolist() == [3, 4]
    starts, ends = split.history_bounds(split.train_pos)
    assert (ends - starts).tolist() == [2, 2]
    everything = split_dataset(ds, min_history=0, max_history=50)
    assert everything.seq_items[everything.train_pos].tolist() == [0, 1, 2, 3]


def test_cold_item_outside_test_is_refused() -> None:
    ds = toy_dataset(["u"] * 4, [1, 7, 2, 3], [1, 2, 3, 4], cold=[7])
    with pytest.raises(DataValidationError, match="cold item 'i7' occurs before the last event of user 'u'"):
        split_dataset(ds)
    ok = toy_dataset(["u"] * 4, [1, 2, 3, 7], [1, 2, 3, 4], cold=[7])
    assert split_dataset(ok).seq_items[split_dataset(ok).test_pos].tolist() == [7]


def test_synthetic_split_is_deterministic_and_cold_free(tmp_config: KarmaConfig, tmp_path: Path) -> None:
    first = load_dataset(tmp_config, "synthetic", progress=False, use_cache=False)
    second = load_dataset(tmp_config, "synthetic", progress=False, use_cache=False)
    a = split_dataset(first, max_history=20)
    b = split_dataset(second, max_history=20)
    assert a.fingerprint() == b.fingerprint()
    cold = first.catalog.cold
    assert cold.sum() > 0
    assert cold[a.seq_items[a.test_pos]].sum() > 0, "the synthetic test split should probe cold items"
    # No cold item in any training or validation target, nor in any of their histories.
    starts, ends = a.history_bounds(np.concatenate([a.train_pos, a.valid_pos]))
    assert not cold[a.seq_items[np.concatenate([a.train_pos, a.valid_pos])]].any()
    for start, end in zip(starts, ends, strict=True):
        assert not cold[a.seq_items[start:end]].any()


def test_dataset_cache_round_trip(tmp_config: KarmaConfig) -> None:
    fresh = load_dataset(tmp_config, "synthetic", progress=False)  # generates and saves
    cached = load_dataset(tmp_config, "synthetic", progress=False)  # reads parquet
    assert split_dataset(fresh).fingerprint() == split_dataset(cached).fingerprint()
    assert cached.catalog.item_text() == fresh.catalog.item_text()
    np.testing.assert_array_equal(cached.catalog.visual, fresh.catalog.visual)
    np.testing.assert_array_equal(cached.interactions.exposed_items, fresh.interactions.exposed_items)
    assert list(cached.interactions.query) == list(fresh.interactions.query)


@pytest.mark.parametrize("max_history", [1, 3, 50])
def test_every_position_windows_supervise_each_training_target_once(max_history: int) -> None:
    rng = np.random.default_rng(0)
    users = [f"u{rng.integers(6)}" for _ in range(60)]
    ds = toy_dataset(users, rng.integers(0, 10, 60).tolist(), list(range(60)))
    split = split_dataset(ds, min_history=2, max_history=max_history)
    windows = training_windows(split, "every", min_history=2)
    covered = []
    for start, end, first in zip(windows.starts, windows.ends, windows.first_target, strict=True):
        assert end - start <= max_history + 1  # a target never sees more than max_history items
        assert split.seq_users[start] == split.seq_users[end - 1]  # one user per window
        covered += [p for p in range(start + 1, end) if p >= first]
    assert sorted(covered) == split.train_pos.tolist()  # every training target exactly once
    assert windows.n_targets == len(split.train_pos)
    last = training_windows(split, "last", min_history=2)  # one window per target, its full history
    assert (last.ends - 1).tolist() == split.train_pos.tolist()
    for start, end in zip(last.starts, last.ends, strict=True):
        assert split.seq_items[start : end - 1].tolist() == split.history(end - 1).tolist()
