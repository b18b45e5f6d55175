"""Tests for the synthetic Taobao-like generator: contract, determinism and the intended structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from karma.config import SyntheticConfig
from karma.errors import ConfigError
from training.data.schema import Dataset
from training.data.synthetic import CATEGORIES, COLOURS, generate_synthetic

SMALL = {"n_items": 1000, "n_users": 300, "n_events": 6000}


def small_cfg(**overrides: object) -> SyntheticConfig:
    return SyntheticConfig(**{**SMALL, **overrides})


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return generate_synthetic(small_cfg(), progress=False)


def last_event_mask(user_idx: np.ndarray) -> np.ndarray:
    """True on the last row of each user (rows are grouped by user)."""
    return np.r_[user_idx[1:] != user_idx[:-1], True]


def mentions(text: str, phrases: tuple[str, ...]) -> bool:
    padded = f" {text.lower()} "
    return any(f" {p.lower()} " in padded for p in phrases)


def category_mention_rate(ds: Dataset) -> float:
    synonyms = {syn[0]: syn for _, syn in CATEGORIES}
    clicked_cat = ds.catalog.items["category"].to_numpy()[ds.interactions.item_idx]
    hits = [mentions(q, synonyms[c]) for q, c in zip(ds.interactions.query, clicked_cat, strict=True)]
    return float(np.mean(hits))


def arrays_of(ds: Dataset) -> dict[str, np.ndarray]:
    inter = ds.interactions
    return {
        "user_idx": inter.user_idx,
        "item_idx": inter.item_idx,
        "timestamp": inter.timestamp,
        "exposed_offsets": inter.exposed_offsets,
        "exposed_items": inter.exposed_items,
        "query": inter.query,
        "user_ids": inter.user_ids,
        "visual": ds.catalog.visual,
        "cold": ds.catalog.cold,
    }


def test_contract_types_and_shapes(ds: Dataset) -> None:
    cat, inter = ds.catalog, ds.interactions
    assert ds.name == "synthetic"
    assert ds.meta["generator_version"]
    assert ds.meta["config"]["n_items"] == SMALL["n_items"]
    assert list(cat.items.columns) == ["item_id", "title", "category", "style", "material", "colour", "brand"]
    assert cat.text_fields[0] == "title"
    assert cat.items["item_id"].is_unique and cat.n_items == SMALL["n_items"]
    assert cat.visual is not None and cat.visual.dtype == np.float32 and cat.visual.shape == (1000, 32)
    np.testing.assert_allclose(np.linalg.norm(cat.visual, axis=1), 1.0, atol=1e-5)
    assert inter.user_idx.dtype == np.int32 and inter.item_idx.dtype == np.int32
    assert inter.timestamp.dtype == np.int64
    assert inter.exposed_offsets is not None and inter.exposed_offsets.dtype == np.int64
    assert inter.exposed_items is not None and inter.exposed_items.dtype == np.int32
    assert inter.query is not None and inter.query.dtype == object
    assert all(isinstance(q, str) and q for q in inter.query)
    assert inter.n_users == SMALL["n_users"]
    assert inter.item_idx.min() >= 0 and inter.item_idx.max() < cat.n_items


def test_same_seed_is_byte_identical() -> None:
    a = generate_synthetic(small_cfg(seed=7), progress=False)
    b = generate_synthetic(small_cfg(seed=7), progress=False)
    for name, arr in arrays_of(a).items():
        other = arrays_of(b)[name]
        assert arr.dtype == other.dtype, name
        if arr.dtype == object:
            assert arr.tolist() == other.tolist(), name
        else:
            assert arr.tobytes() == other.tobytes(), name
    pd.testing.assert_frame_equal(a.catalog.items, b.catalog.items)
    assert a.meta == b.meta


def test_different_seed_differs() -> None:
    a = generate_synthetic(small_cfg(seed=1), progress=False)
    b = generate_synthetic(small_cfg(seed=2), progress=False)
    assert a.catalog.items["title"].tolist() != b.catalog.items["title"].tolist()
    assert not np.array_equal(a.catalog.visual, b.catalog.visual)
    assert not np.array_equal(a.interactions.item_idx, b.interactions.item_idx)
    assert a.interactions.query.tolist() != b.interactions.query.tolist()


def test_events_grouped_by_user_and_chronological(ds: Dataset) -> None:
    inter = ds.interactions
    assert np.all(np.diff(inter.user_idx) >= 0), "rows must be grouped by user"
    counts = np.bincount(inter.user_idx, minlength=inter.n_users)
    assert counts.min() >= 3
    assert inter.n_events == max(SMALL["n_events"], 3 * SMALL["n_users"])
    same_user = inter.user_idx[1:] == inter.user_idx[:-1]
    assert np.all(np.diff(inter.timestamp)[same_user] >= 0)
    assert counts.max() > 3 * np.median(counts), "events per user should be heavy-tailed"


def test_cold_items_only_as_last_event(ds: Dataset) -> None:
    cold, inter = ds.catalog.cold, ds.interactions
    assert cold is not None and cold.sum() == round(0.05 * SMALL["n_items"])
    clicked_cold = cold[inter.item_idx]
    last = last_event_mask(inter.user_idx)
    assert not np.any(clicked_cold & ~last), "a cold item was clicked before a user's last event"
    assert not np.any(cold[inter.exposed_items]), "a cold item was exposed"
    assert clicked_cold.sum() == round(0.2 * SMALL["n_users"])


def test_cold_targets_match_intent_category(ds: Dataset) -> None:
    inter = ds.interactions
    targets = np.flatnonzero(ds.catalog.cold[inter.item_idx])
    category = ds.catalog.items["category"].to_numpy()
    previous = category[inter.item_idx[targets - 1]]
    # The user's intent is sticky, so the cold target usually shares the category of the event before.
    assert np.mean(category[inter.item_idx[targets]] == previous) > 0.3


def test_no_cold_items_when_fraction_is_zero() -> None:
    d = generate_synthetic(small_cfg(cold_item_fraction=0.0), progress=False)
    assert d.catalog.cold is not None and not d.catalog.cold.any()


def test_popularity_skew(ds: Dataset) -> None:
    clicks = np.bincount(ds.interactions.item_idx, minlength=ds.catalog.n_items)
    top = np.sort(clicks)[::-1][: ds.catalog.n_items // 100]
    assert top.sum() / clicks.sum() > 0.10


def test_shortcut_concentrates_clicks_on_popular_items() -> None:
    def top_share(d: Dataset) -> float:
        clicks = np.bincount(d.interactions.item_idx, minlength=d.catalog.n_items)
        return float(np.sort(clicks)[::-1][:10].sum() / clicks.sum())

    none = generate_synthetic(small_cfg(popularity_shortcut=0.0), progress=False)
    heavy = generate_synthetic(small_cfg(popularity_shortcut=0.8), progress=False)
    assert top_share(heavy) > top_share(none) + 0.1


def test_exposed_items_are_distinct_and_never_the_click(ds: Dataset) -> None:
    inter = ds.interactions
    offsets = inter.exposed_offsets
    assert offsets is not None and inter.exposed_items is not None
    assert offsets[0] == 0 and offsets[-1] == len(inter.exposed_items) and len(offsets) == inter.n_events + 1
    sizes = np.diff(offsets)
    assert sizes.max() <= 4 and sizes.mean() > 3
    for e in range(inter.n_events):
        shown = inter.exposed_of(e)
        assert inter.item_idx[e] not in shown
        assert len(np.unique(shown)) == len(shown)


def test_no_exposure_when_disabled() -> None:
    d = generate_synthetic(small_cfg(exposed_per_event=0), progress=False)
    assert d.interactions.exposed_items is not None and len(d.interactions.exposed_items) == 0


def test_visual_clusters_by_category_not_brand(ds: Dataset) -> None:
    v = ds.catalog.visual
    assert v is not None
    category = ds.catalog.items["category"].to_numpy()
    brand = ds.catalog.items["brand"].to_numpy()
    sim = v @ v.T
    iu = np.triu_indices(len(v), 1)
    same_cat = (category[:, None] == category[None, :])[iu]
    same_brand = (brand[:, None] == brand[None, :])[iu]
    s = sim[iu]
    assert s[same_cat].mean() > s[~same_cat].mean() + 0.2
    brand_only = same_brand & ~same_cat
    assert brand_only.sum() > 100
    assert s[brand_only].mean() < s[~same_cat].mean() + 0.05


def test_visual_reflects_colour(ds: Dataset) -> None:
    v = ds.catalog.visual
    assert v is not None
    items = ds.catalog.items
    category, colour = items["category"].to_numpy(), items["colour"].to_numpy()
    sim = v @ v.T
    iu = np.triu_indices(len(v), 1)
    diff_cat = (category[:, None] != category[None, :])[iu]
    same_col = (colour[:, None] == colour[None, :])[iu]
    s = sim[iu]
    assert s[diff_cat & same_col].mean() > s[diff_cat & ~same_col].mean() + 0.1


def test_titles_use_category_and_colour_synonyms(ds: Dataset) -> None:
    items = ds.catalog.items
    cat_syn = {syn[0]: syn for _, syn in CATEGORIES}
    col_syn = {syn[0]: syn for syn in COLOURS}
    rows = list(zip(items["title"], items["category"], items["colour"], items["brand"], strict=True))
    assert all(mentions(t, cat_syn[c]) and mentions(t, col_syn[k]) and b in t for t, c, k, b in rows)
    canonical = np.mean([mentions(t, (c,)) for t, c, _, _ in rows])
    assert canonical < 0.8, "titles should often use a non-canonical synonym"


def test_queries_follow_the_clicked_category() -> None:
    none = generate_synthetic(small_cfg(popularity_shortcut=0.0), progress=False)
    default = generate_synthetic(small_cfg(), progress=False)
    only = generate_synthetic(small_cfg(popularity_shortcut=1.0, cold_item_fraction=0.0), progress=False)
    assert category_mention_rate(none) > 0.9
    assert category_mention_rate(default) > 0.6
    assert category_mention_rate(only) < 0.3


def test_clicks_follow_query_colour() -> None:
    d = generate_synthetic(small_cfg(popularity_shortcut=0.0), progress=False)
    col_syn = {syn[0]: syn for syn in COLOURS}
    clicked_colour = d.catalog.items["colour"].to_numpy()[d.interactions.item_idx]
    asked = [(q, c) for q, c in zip(d.interactions.query, clicked_colour, strict=True)]
    with_colour = [(q, c) for q, c in asked if any(mentions(q, s) for s in col_syn.values())]
    assert len(with_colour) > 1000
    match = np.mean([mentions(q, col_syn[c]) for q, c in with_colour])
    assert match > 0.15, "a query colour should raise the clicked colour well above chance (1/20)"


def test_save_load_round_trip(ds: Dataset, tmp_path: Path) -> None:
    ds.save(tmp_path / "synthetic")
    back = Dataset.load(tmp_path / "synthetic")
    assert back.name == ds.name
    assert back.meta == ds.meta
    assert back.catalog.text_fields == ds.catalog.text_fields
    pd.testing.assert_frame_equal(back.catalog.items, ds.catalog.items, check_dtype=False)
    for name, arr in arrays_of(ds).items():
        other = arrays_of(back)[name]
        if arr.dtype == object:
            assert other.tolist() == arr.tolist(), name
        else:
            assert other.dtype == arr.dtype, name
            assert np.array_equal(other, arr), name


def test_bad_interest_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="interests_per_user"):
        generate_synthetic(small_cfg(interests_per_user=(3, 2)), progress=False)
