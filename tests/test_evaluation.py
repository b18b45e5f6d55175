"""Full-ranking evaluation and the reference baselines (popularity, SASRec) on real data."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from karma.config import KarmaConfig
from training.baselines import (
    SASRecConfig,
    content_embeddings,
    popularity_counts,
    popularity_embeddings,
    run_baselines,
    sasrec_item_embeddings,
    sasrec_user_embeddings,
    train_sasrec,
    training_windows,
)
from training.data.registry import load_dataset
from training.data.split import split_dataset
from training.evaluation import (
    eval_targets,
    evaluate_embeddings,
    metrics_from_ranks,
    print_metrics_table,
    protocol_text,
    rank_from_scores,
    rank_targets,
    save_metrics_json,
)

# 6 items on a line: for a user embedding u, item i scores u * (5 - i).
ITEMS = torch.tensor([[5.0], [4.0], [3.0], [2.0], [1.0], [0.0]])


def csr(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    return offsets, np.array([i for x in lists for i in x], dtype=np.int64)


def test_ranks_hand_built_with_exclusion_and_target_in_history() -> None:
    users = torch.tensor([[1.0], [1.0], [-1.0]])
    targets = torch.tensor([3, 1, 4])
    # No exclusion: user 0's target (score 2) is beaten by items 0, 1, 2; user 1's (score 4) by item 0;
    # user 2 (reversed order) has target 4 (score -1) beaten by item 5 (score 0).
    assert rank_targets(users, ITEMS, targets).tolist() == [3, 1, 1]
    # History: user 0 saw items 0 and 5; user 1 saw its own target (re-consumption) plus 0 and 2;
    # user 2 saw nothing. The target is never excluded; excluded items never count above it.
    offsets, items = csr([[0, 5], [1, 0, 2, 0], []])
    assert rank_targets(users, ITEMS, targets, offsets, items).tolist() == [2, 0, 1]
    # The dense-mask helper agrees.
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, [0, 5]] = True
    mask[1, [1, 0, 2]] = True
    assert rank_from_scores(users @ ITEMS.T, targets, mask).tolist() == [2, 0, 1]


def test_ties_are_pessimistic() -> None:
    users = torch.zeros(2, 1)  # every item scores 0: a collapsed model must not look perfect
    offsets, items = csr([[], [0, 2]])
    assert rank_targets(users, ITEMS, torch.tensor([3, 3]), offsets, items).tolist() == [5, 3]
    with pytest.raises(ValueError, match="NaN"):
        rank_targets(torch.tensor([[math.nan]]), ITEMS, torch.tensor([0]))


def test_metrics_from_ranks_by_hand() -> None:
    m = metrics_from_ranks(torch.tensor([0, 2, 10]), ks=[3, 1])
    assert m["count"] == 3
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["HR@3"] == pytest.approx(2 / 3)
    assert m["NDCG@1"] == pytest.approx(1 / 3)
    assert m["NDCG@3"] == pytest.approx((1.0 + 1.0 / math.log2(4)) / 3)
    assert m["MRR"] == pytest.approx((1.0 + 1 / 3 + 1 / 11) / 3)
    empty = metrics_from_ranks(torch.zeros(0, dtype=torch.int64), ks=[10])
    assert empty["count"] == 0 and math.isnan(empty["HR@10"])


def test_batching_gives_the_same_ranks() -> None:
    gen = torch.Generator().manual_seed(0)
    users, items = torch.randn(37, 8, generator=gen), torch.randn(50, 8, generator=gen)
    targets = torch.randint(0, 50, (37,), generator=gen)
    rng = np.random.default_rng(0)
    offsets, excl = csr([list(rng.integers(0, 50, rng.integers(0, 12))) for _ in range(37)])
    full = rank_targets(users, items, targets, offsets, excl, batch_size=10_000)
    for batch in (1, 7, 36):
        assert torch.equal(rank_targets(users, items, targets, offsets, excl, batch_size=batch), full)
    mask = torch.zeros(37, 50, dtype=torch.bool)
    for u in range(37):
        mask[u, excl[offsets[u] : offsets[u + 1]]] = True
    assert torch.equal(rank_from_scores(users @ items.T, targets, mask), full)


@pytest.fixture
def synthetic(tmp_config: KarmaConfig):
    ds = load_dataset(tmp_config, "synthetic", progress=False)
    return ds, split_dataset(ds, max_history=5)


def test_protocol_targets_and_text(synthetic) -> None:
    ds, split = synthetic
    targets = eval_targets(split, "test", exclude_history=True)
    assert targets.n_users == len(split.test_pos)
    # Exclusion uses the FULL history before the target, the model input only the newest 5 events.
    starts = split.user_offsets[targets.users]
    assert np.array_equal(np.diff(targets.exclude_offsets), targets.positions - starts)
    assert (np.diff(targets.exclude_offsets) > 5).any()
    assert np.all(targets.history_end - targets.history_start <= 5)
    u = 3
    full = split.seq_items[starts[u] : targets.positions[u]]
    assert np.array_equal(targets.exclude_items[targets.exclude_offsets[u] : targets.exclude_offsets[u + 1]], full)
    assert eval_targets(split, "valid", exclude_history=False, max_users=10).exclude_offsets is None

    text = protocol_text(ds.name, "test", targets.n_users, [10, 50, 200], True, 5, n_items=ds.catalog.n_items)
    assert "full ranking over all 1000 catalog items" in text
    assert "K=10/50/200" in text and f"users={targets.n_users}" in text
    assert "history excluded" in text and "split=test" in text


def test_popularity_beats_random_and_reports_cold(synthetic, tmp_path: Path) -> None:
    ds, split = synthetic
    targets = eval_targets(split, "test", exclude_history=True)
    users, items = popularity_embeddings(split, ds.catalog.n_items, targets.n_users)
    assert items[:, 0].sum() == len(split.seq_items) - len(split.valid_pos) - len(split.test_pos)
    assert popularity_counts(split, ds.catalog.n_items)[ds.catalog.cold].sum() == 0
    popular = evaluate_embeddings(users, items, targets, ds.catalog.cold, ks=[10, 50])
    gen = torch.Generator().manual_seed(0)
    rand_items = torch.randn(ds.catalog.n_items, 32, generator=gen)
    rand_users = torch.randn(targets.n_users, 32, generator=gen)
    random = evaluate_embeddings(rand_users, rand_items, targets, ds.catalog.cold, ks=[10, 50])
    assert set(popular) == {"all", "warm", "cold"}
    assert popular["warm"]["count"] + popular["cold"]["count"] == targets.n_users
    assert popular["cold"]["count"] > 0 and popular["cold"]["HR@50"] == 0.0  # popularity never finds cold items
    assert popular["all"]["HR@50"] > 2 * random["all"]["HR@50"], (popular["all"], random["all"])

    results = {"popular": popular, "random": random}
    text = protocol_text(ds.name, "test", targets.n_users, [10, 50], True, n_items=ds.catalog.n_items)
    console = Console(record=True, width=200)
    print_metrics_table(results, text, "synthetic", console=console)
    out = console.export_text()
    assert "HR@50" in out and "NDCG@10" in out and "popular" in out and "full ranking" in out
    saved = json.loads(save_metrics_json(tmp_path / "m.json", results, text).read_text())
    assert saved["protocol"] == text and saved["results"]["popular"]["all"]["count"] == targets.n_users


def test_sasrec_windows_cover_every_training_target_once(synthetic) -> None:
    _, split = synthetic  # min_history=1: train targets are every non-first, non-held-out event
    _inputs, targets = training_windows(split, max_len=7)
    got = np.sort(targets[targets >= 0])
    assert np.array_equal(got, np.sort(split.seq_items[split.train_pos].astype(np.int64)))


@pytest.mark.integration  # trains SASRec on ML-100K (~13 s)
def test_sasrec_beats_popularity_on_ml100k(tmp_config: KarmaConfig) -> None:
    """Test split, full ranking over all 1682 items, history excluded; short CE training (~5-15 s on 2 cores)."""
    ds = load_dataset(tmp_config, "ml-100k", progress=False)
    split = split_dataset(ds)
    cfg = SASRecConfig(epochs=5, lr=2e-3, batch_size=64, max_windows_per_user=1, eval_every=0, threads=1)
    t0 = time.perf_counter()
    results = run_baselines(ds, split, tmp_config, ("popular", "sasrec"), sasrec_cfg=cfg, progress=False)
    seconds = time.perf_counter() - t0
    pop, sas = results["popular"]["all"], results["sasrec"]["all"]
    print(f"ml-100k test: popular {pop}\nsasrec {sas}\n({seconds:.1f}s)")
    assert pop["count"] == sas["count"] == 943
    assert sas["HR@10"] > 1.2 * pop["HR@10"], (sas, pop)
    assert sas["NDCG@10"] > 1.2 * pop["NDCG@10"], (sas, pop)


def test_sasrec_bce_and_embeddings_shapes(synthetic) -> None:
    ds, split = synthetic
    cfg = SASRecConfig(hidden=16, heads=1, ffn_hidden=32, max_len=8, epochs=1, loss="bce", eval_every=1)
    model = train_sasrec(ds, split, cfg, progress=False)
    assert len(model.train_log) == 1 and "valid_NDCG@10" in model.train_log[0]
    assert math.isfinite(model.train_log[0]["loss"])
    users = sasrec_user_embeddings(model, ds, split, split.test_pos[:20])
    assert users.shape == (20, 16) and sasrec_item_embeddings(model).shape == (ds.catalog.n_items, 16)
    # A user's embedding depends only on the newest max_len events before the target.
    again = sasrec_user_embeddings(model, ds, split, split.test_pos[:20], batch_size=3)
    assert torch.allclose(users, again, atol=1e-5)


def test_content_baseline_is_the_mean_of_the_history_text_vectors(tmp_config: KarmaConfig) -> None:
    """Frozen content retriever: hand-computed user vectors; it reaches cold items, popularity cannot."""
    from training.features import build_item_features

    ds = load_dataset(tmp_config, progress=False)
    split = split_dataset(ds, tmp_config.data.min_history, max_history=5)
    targets = eval_targets(split, "test")
    text = build_item_features(ds.catalog, tmp_config, progress=False).block("text:hashing-128")
    users, items = content_embeddings(text, split, targets)
    for u in (0, 7, targets.n_users - 1):
        hist = split.seq_items[targets.history_start[u] : targets.history_end[u]]
        assert 1 <= len(hist) <= 5
        vecs = text[hist] / np.linalg.norm(text[hist], axis=1, keepdims=True)
        expected = vecs.mean(0) / np.linalg.norm(vecs.mean(0))
        np.testing.assert_allclose(users[u].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(torch.linalg.norm(items, dim=1).numpy(), 1.0, atol=1e-5)
    results = run_baselines(ds, split, tmp_config, ("popular", "content"), progress=False)
    assert results["popular"]["cold"]["HR@200"] == 0.0 < results["content"]["cold"]["HR@200"]
