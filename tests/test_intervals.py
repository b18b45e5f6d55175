"""Popularity buckets and the study's bootstrap intervals: pure numpy, checked against closed forms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recipes.study.intervals import Bootstrap, RankRuns, against_one, paired_intervals, per_user, update_archive
from training.evaluation.metrics import metrics_from_ranks
from training.evaluation.popularity import NO_BUCKET, popularity_buckets


def test_buckets_split_training_clicks_in_thirds() -> None:
    clicks = np.array([60, 0, 30, 5, 5, 20, 10, 0, 100])
    cold = np.zeros(len(clicks), dtype=bool)
    cold[7] = True
    buckets = popularity_buckets(clicks, cold)
    # Sorted: 100 (item 8) takes the first 43% alone -> head; 60 (item 0) starts at 43% -> torso;
    # 30 starts at 69% -> tail, and so does everything after it; cold item 7 has no bucket.
    assert buckets.tolist() == [1, 2, 2, 2, 2, 2, 2, NO_BUCKET, 0]
    flat = popularity_buckets(np.full(9, 10))
    assert np.bincount(flat).tolist() == [3, 3, 3]  # equal clicks: equal thirds
    assert popularity_buckets(np.zeros(4, dtype=int)).tolist() == [2, 2, 2, 2]  # nothing clicked: all tail
    with pytest.raises(ValueError, match="shares"):
        popularity_buckets(clicks, shares=(0.6, 0.5))


def test_per_user_values_average_to_the_reported_metrics() -> None:
    ranks = np.array([0, 3, 9, 10, 49, 199, 200, 1000])
    reported = metrics_from_ranks(ranks, (10, 50, 200))
    for k in ("HR@10", "HR@200", "NDCG@10", "NDCG@200", "MRR"):
        assert per_user(ranks, k).mean() == pytest.approx(reported[k])
    with pytest.raises(ValueError, match="unknown metric"):
        per_user(ranks, "AUC")


def _runs(ranks: np.ndarray, seeds=(0, 1, 2)) -> RankRuns:
    n = ranks.shape[1]
    return RankRuns(tuple(seeds), ranks, {"all": np.ones(n, dtype=bool), "head": np.arange(n) < n // 2})


def test_bootstrap_interval_matches_the_binomial_and_pairs_cancel_shared_noise() -> None:
    rng = np.random.default_rng(1)
    n = 4000
    hits = rng.random((1, n)) < 0.3
    boot = Bootstrap(n)
    one = boot.interval(hits.astype(float), np.ones(n, dtype=bool))
    se = np.sqrt(0.3 * 0.7 / n)
    assert one["mean"] == pytest.approx(hits.mean())
    assert one["hi"] - one["lo"] == pytest.approx(2 * 1.96 * se, rel=0.15)
    # A model that is the reference plus one extra hit per 10 users: the paired delta is +0.1 with a
    # tight interval, although each model's own interval is wide.
    ref_ranks = rng.integers(0, 500, size=(3, n))
    better = ref_ranks.copy()
    better[:, ::10] = 0
    gain = (ref_ranks[:, ::10] >= 10).mean()
    delta = paired_intervals(boot, _runs(better), _runs(ref_ranks), ["HR@10"])["all"]["HR@10"]
    assert delta["mean"] == pytest.approx(gain / 10, rel=1e-9) and delta["p_le_0"] == 0.0
    assert delta["lo"] > 0 and delta["paired_seeds"] == [0, 1, 2]
    same = paired_intervals(boot, _runs(ref_ranks), _runs(ref_ranks), ["HR@200"])["head"]["HR@200"]
    assert same["mean"] == same["lo"] == same["hi"] == 0.0 and same["users"] == n // 2
    assert paired_intervals(boot, _runs(ref_ranks, (5, 6, 7)), _runs(ref_ranks), ["HR@10"]) is None
    # Against a one-run model: users paired, this model's seeds resampled.
    vs = against_one(boot, _runs(better), _runs(ref_ranks[:1], (0,)), ["HR@10"])["all"]["HR@10"]
    assert vs["seeds"] == 3 and vs["mean"] == pytest.approx((better < 10).mean() - (ref_ranks[0] < 10).mean())


def test_rank_archive_keeps_what_is_gone_and_refuses_other_targets(tmp_path: Path) -> None:
    targets = np.arange(6)
    for name, ranks in {"a": [0, 1, 2, 3, 4, 5], "b": [5, 4, 3, 2, 1, 0]}.items():
        np.savez(tmp_path / f"{name}.npz", ranks=np.array(ranks), target_items=targets, bucket=np.array([0, 1, 2] * 2))
    archive = tmp_path / "report" / "ranks.npz"
    first = update_archive(archive, {"m": {0: tmp_path / "a.npz"}})
    assert first["m"].seeds == (0,) and first["m"].masks["head"].tolist() == [True, False, False] * 2
    both = update_archive(archive, {"m": {1: tmp_path / "b.npz"}})  # seed 0's file no longer given: kept
    assert both["m"].seeds == (0, 1) and both["m"].ranks[1].tolist() == [5, 4, 3, 2, 1, 0]
    np.savez(tmp_path / "c.npz", ranks=np.zeros(6, dtype=int), target_items=targets[::-1])
    with pytest.raises(ValueError, match="other test targets"):
        update_archive(archive, {"x": {0: tmp_path / "c.npz"}})
