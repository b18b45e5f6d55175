"""95% intervals from per-user ranks: a bootstrap over test users and seeds, paired across models.

Why a bootstrap over both: a study's numbers vary with the seed (initialisation, batch order,
negatives) *and* with which users happen to be in the test set. A t-interval over five seed means
sees only the first; a bootstrap over users only the second. Here every replicate draws the seeds
with replacement and, independently, the test users with replacement (one user draw shared by every
model and seed: the users are the same people in every run), then averages the per-user metric over
the drawn users of each drawn seed.

Paired deltas (preset − action-only) take the per-user difference on the same seed and user before
resampling, so noise the two runs share (a hard user, a lucky seed) cancels. `p_le_0` is the share
of replicates with a delta ≤ 0: a one-sided bootstrap p-value for "the preset is better".

With one seed the interval is over users only and says nothing about seed-to-seed spread; the
report marks such rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluation.popularity import BUCKETS

N_BOOT = 2000
LEVEL = 0.95
BOOT_SEED = 0  # the same replicates for every model of a study (regenerating the report gives the same intervals)
INTERVAL_RULE = (
    f"{LEVEL:.0%} percentile interval of {N_BOOT:,} bootstrap replicates that resample the seeds and the test "
    "users with replacement (one user draw shared by every model); paired deltas resample per-user differences "
    "on the same seed"
)


@dataclass(frozen=True)
class RankRuns:
    """One model's test ranks: one row per seed (same users, same order, in every row)."""

    seeds: tuple[int, ...]
    ranks: np.ndarray  # (seeds, users) int64, 0-based
    masks: Mapping[str, np.ndarray]  # segment -> (users,) bool


def segment_masks(data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Users of each segment: all; warm/cold when the file marks cold targets; head/torso/tail by bucket."""
    n = len(data["ranks"])
    masks = {"all": np.ones(n, dtype=bool)}
    if "cold" in data:
        masks["warm"], masks["cold"] = ~data["cold"], data["cold"].astype(bool)
    if "bucket" in data:
        for b, name in enumerate(BUCKETS):
            masks[name] = data["bucket"] == b
    return masks


def per_user(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-user value of HR@K / NDCG@K / MRR from 0-based ranks (their mean is the reported metric)."""
    ranks = np.asarray(ranks)
    if metric == "MRR":
        return 1.0 / (ranks + 1.0)
    name, _, k = metric.partition("@")
    if name not in ("HR", "NDCG") or not k.isdigit():
        raise ValueError(f"unknown metric {metric!r} (HR@K, NDCG@K or MRR)")
    hit = ranks < int(k)
    if name == "HR":
        return hit.astype(np.float64)
    return np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)


class Bootstrap:
    """Fixed replicates for one study: user weights (multinomial counts) and seed draws per replicate."""

    def __init__(self, n_users: int, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> None:
        rng = np.random.default_rng(seed)
        self.n_users, self.n_boot = n_users, n_boot
        self.user_weights = rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=n_boot).astype(np.float64)
        self._seed_draws: dict[int, np.ndarray] = {}
        self._weights: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}  # per segment: (weights, their row sums)

    def seed_draws(self, n_seeds: int) -> np.ndarray:
        """(n_boot, n_seeds) seed indices drawn with replacement; fixed per seed count."""
        if n_seeds not in self._seed_draws:
            self._seed_draws[n_seeds] = np.random.default_rng([BOOT_SEED, n_seeds]).integers(
                0, n_seeds, size=(self.n_boot, n_seeds)
            )
        return self._seed_draws[n_seeds]

    def interval(self, values: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
        """{mean, lo, hi, p_le_0, seeds, users} of the mean of `values` (seeds, users) over `mask`'s users."""
        values = np.atleast_2d(np.asarray(values, dtype=np.float64))
        n_seeds, users = values.shape[0], int(mask.sum())
        if users == 0:
            return {"mean": None, "lo": None, "hi": None, "p_le_0": None, "seeds": n_seeds, "users": 0}
        key = hashlib.sha1(np.packbits(mask).tobytes()).digest()
        if key not in self._weights:  # a segment's columns are sliced once, not once per model and metric
            w = self.user_weights[:, mask]
            self._weights[key] = (w, np.maximum(w.sum(axis=1, keepdims=True), 1.0))
        w, total = self._weights[key]
        per_seed = (w @ values[:, mask].T) / total  # (boot, seeds)
        replicates = np.take_along_axis(per_seed, self.seed_draws(n_seeds), axis=1).mean(axis=1)
        lo, hi = np.quantile(replicates, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
        return {
            "mean": float(values[:, mask].mean()),
            "lo": float(lo),
            "hi": float(hi),
            "p_le_0": float((replicates <= 0).mean()),
            "seeds": n_seeds,
            "users": users,
        }


def _segment_intervals(
    boot: Bootstrap,
    masks: Mapping[str, np.ndarray],
    values_of: Callable[[str], np.ndarray],
    metrics: Sequence[str],
    **extra: Any,
) -> dict[str, dict[str, Any]]:
    """segment -> metric -> interval of `values_of(metric)` (seeds, users) over the segment's users."""
    values = {k: values_of(k) for k in metrics}  # per metric once, not once per segment
    return {seg: {k: {**boot.interval(values[k], mask), **extra} for k in metrics} for seg, mask in masks.items()}


def model_intervals(boot: Bootstrap, runs: RankRuns, metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """segment -> metric -> interval of one model's metric."""
    return _segment_intervals(boot, runs.masks, lambda k: per_user(runs.ranks, k), metrics)


def paired_intervals(
    boot: Bootstrap, runs: RankRuns, reference: RankRuns, metrics: Sequence[str]
) -> dict[str, dict[str, Any]] | None:
    """segment -> metric -> interval of (model − reference) over the seeds both have; None if none shared."""
    shared = [s for s in runs.seeds if s in reference.seeds]
    if not shared:
        return None
    a = runs.ranks[[runs.seeds.index(s) for s in shared]]
    b = reference.ranks[[reference.seeds.index(s) for s in shared]]
    return _segment_intervals(boot, runs.masks, lambda k: per_user(a, k) - per_user(b, k), metrics, paired_seeds=shared)


def against_one(boot: Bootstrap, runs: RankRuns, other: RankRuns, metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """segment -> metric -> interval of (model − a one-seed model, e.g. a baseline), users paired.

    The other model's single run is subtracted from every seed of this one: the interval covers
    this model's seed spread and the users, not the other model's seed spread.
    """
    b = other.ranks[:1]
    return _segment_intervals(boot, runs.masks, lambda k: per_user(runs.ranks, k) - per_user(b, k), metrics)


ARCHIVE = "ranks.npz"  # in the report folder: every model's test ranks, so intervals regenerate without artifacts
_SEP = "__"


def update_archive(path: Path, files: Mapping[str, Mapping[int, Path]]) -> dict[str, RankRuns]:
    """Merge the rank files on disk (model -> seed -> path) into the report's archive; return every model in it.

    Models or seeds whose files are gone (adopted runs, a fresh checkout) keep their archived ranks;
    a file on disk replaces its archived copy. The shared arrays (targets, cold, bucket) come from
    the first file; a file of other targets is refused.
    """
    arrays: dict[str, np.ndarray] = {}
    if path.exists():
        with np.load(path) as old:
            arrays = {k: old[k] for k in old.files}
    for model, by_seed in files.items():
        for seed, file in by_seed.items():
            with np.load(file) as data:
                if "target_items" in arrays and not np.array_equal(arrays["target_items"], data["target_items"]):
                    raise ValueError(f"{file}: ranks other test targets than the study's archive {path}")
                for key in ("target_items", "cold", "bucket"):
                    if key in data and key not in arrays:
                        arrays[key] = data[key]
                arrays[_SEP.join(("ranks", model, f"s{seed}"))] = data["ranks"].astype(np.int32)
    if not arrays:
        return {}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    shared = {k: arrays[k] for k in ("cold", "bucket") if k in arrays}
    masks = segment_masks({"ranks": arrays["target_items"], **shared})
    by_model: dict[str, dict[int, np.ndarray]] = {}
    for key, value in arrays.items():
        if key.startswith("ranks" + _SEP):
            _, model, seed = key.split(_SEP)
            by_model.setdefault(model, {})[int(seed[1:])] = value
    return {
        model: RankRuns(tuple(sorted(seeds)), np.stack([seeds[s] for s in sorted(seeds)]).astype(np.int64), masks)
        for model, seeds in by_model.items()
    }
