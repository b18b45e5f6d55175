"""Build every item's frozen content feature vector, in the layout that training, export and serving share.

Blocks, in this order (each present only when configured and available):

1. text: the configured text encoder over `Catalog.item_text()` ('text:minilm-l6-v2' or 'text:hashing-<dim>');
2. 'visual:data': the data set's own frozen visual vectors (`Catalog.visual`), when `use_visual`;
3. 'visual:efficientnet-lite0': EfficientNet-Lite0 features of `<image_dir>/<item_id>.<ext>`, when
   `use_visual` and `image_dir` is set.

The hashed item ID is not a float block: it travels beside the matrix as `id_buckets`
(`FeatureLayout.id_buckets > 0`) because it feeds a trained embedding table.
Encoder outputs are cached on disk (`training.features.cache`), so rebuilding is cheap.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from karma.config import KarmaConfig
from karma.contracts import FeatureBlock, FeatureLayout
from karma.errors import KarmaError
from karma.hashed_id import hashed_id_buckets
from training.data.schema import Catalog
from training.features.cache import FeatureCache, save_npy_atomic, save_text_atomic
from training.features.text import make_text_encoder

logger = logging.getLogger(__name__)

FEATURES_FILE = "features.npy"
LAYOUT_FILE = "layout.json"
ID_BUCKETS_FILE = "id_buckets.npy"
VISUAL_DATA_BLOCK = "visual:data"


@dataclass
class ItemFeatures:
    """Row-aligned item features: `matrix[i]` and `id_buckets[i]` belong to catalog row `i`."""

    matrix: np.ndarray  # (N, F) float32, F == layout.dim
    layout: FeatureLayout
    id_buckets: np.ndarray | None = None  # (N,) int64 in [0, layout.id_buckets) when layout.id_buckets > 0

    def __post_init__(self) -> None:
        if self.matrix.ndim != 2 or self.matrix.dtype != np.float32:
            raise ValueError(f"item features must be a 2-d float32 matrix, got {self.matrix.dtype} {self.matrix.shape}")
        if self.matrix.shape[1] != self.layout.dim:
            raise ValueError(f"item features have {self.matrix.shape[1]} columns, the layout says {self.layout.dim}")
        if (self.id_buckets is None) != (self.layout.id_buckets == 0):
            raise ValueError("id_buckets must be given exactly when layout.id_buckets > 0")
        if self.id_buckets is not None:
            if self.id_buckets.shape != (self.n_items,) or self.id_buckets.dtype != np.int64:
                raise ValueError(
                    f"id_buckets must be ({self.n_items},) int64, got {self.id_buckets.dtype} {self.id_buckets.shape}"
                )
            if self.n_items and (self.id_buckets.min() < 0 or self.id_buckets.max() >= self.layout.id_buckets):
                raise ValueError(f"id_buckets out of range [0, {self.layout.id_buckets})")

    @property
    def n_items(self) -> int:
        return int(self.matrix.shape[0])

    def block(self, name: str) -> np.ndarray:
        """The columns of one named block (a view)."""
        return self.matrix[:, self.layout.slice_of(name)]

    def save(self, directory: Path) -> None:
        """Write features.npy + layout.json (+ id_buckets.npy), each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_npy_atomic(directory / FEATURES_FILE, self.matrix)
        if self.id_buckets is not None:
            save_npy_atomic(directory / ID_BUCKETS_FILE, self.id_buckets)
        else:
            (directory / ID_BUCKETS_FILE).unlink(missing_ok=True)
        # The layout goes last: a folder with a layout.json is a complete one.
        save_text_atomic(directory / LAYOUT_FILE, json.dumps(self.layout.to_dict(), indent=2))

    @classmethod
    def load(cls, directory: Path) -> ItemFeatures:
        directory = Path(directory)
        layout_path = directory / LAYOUT_FILE
        if not layout_path.is_file():
            raise KarmaError(f"{directory}: no {LAYOUT_FILE}; build item features first")
        layout = FeatureLayout.from_dict(json.loads(layout_path.read_text(encoding="utf-8")))
        matrix = np.load(directory / FEATURES_FILE, allow_pickle=False)
        buckets = np.load(directory / ID_BUCKETS_FILE, allow_pickle=False) if layout.id_buckets > 0 else None
        try:
            return cls(matrix=matrix, layout=layout, id_buckets=buckets)
        except ValueError as exc:
            raise KarmaError(f"{directory}: inconsistent item features: {exc}") from None


def _image_fingerprint(path: Path | None) -> str:
    """Cache input for one image: a digest of its bytes, so an edited image is a cache miss."""
    if path is None:
        return "missing"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _visual_data_block(catalog: Catalog) -> np.ndarray:
    visual = np.asarray(catalog.visual, dtype=np.float32)
    if visual.ndim != 2 or visual.shape[0] != catalog.n_items:
        raise KarmaError(f"catalog visual vectors have shape {visual.shape}, expected ({catalog.n_items}, V)")
    if not np.isfinite(visual).all():
        raise KarmaError("catalog visual vectors contain NaN or infinite values")
    return visual


def _image_block(catalog: Catalog, config: KarmaConfig, cache: FeatureCache, progress: bool) -> tuple[str, np.ndarray]:
    from training.features.visual import EfficientNetLite0Encoder, find_item_image

    image_dir = config.features.image_dir
    assert image_dir is not None
    if not image_dir.is_dir():
        raise KarmaError(f"features.image_dir {image_dir}: not a folder")
    paths = [find_item_image(image_dir, item_id) for item_id in catalog.item_ids]
    found = sum(p is not None for p in paths)
    if found == 0:
        raise KarmaError(
            f"features.image_dir {image_dir}: no item images found (expected files named <item_id>.jpg/.png, "
            f"e.g. {catalog.item_ids[0] if catalog.n_items else 'ITEM'}.jpg)"
        )
    logger.info("images: %s of %s items have an image file in %s", found, catalog.n_items, image_dir)
    encoder = EfficientNetLite0Encoder(threads=config.features.threads, progress=progress)
    inputs = [f"{item_id}\0{_image_fingerprint(p)}" for item_id, p in zip(catalog.item_ids, paths, strict=True)]
    matrix = cache.get_or_compute(encoder.name, encoder.version, inputs, lambda: encoder.encode_images(paths))
    return encoder.name, matrix


EXACT_ID_MAX_ITEMS = 5_000_000  # beyond this an exact table (items x hidden floats) is hashed's job


def item_id_rows(catalog: Catalog, config: KarmaConfig) -> tuple[np.ndarray | None, int, int]:
    """Each item's ID-table row, the table size and the hash seed, for `features.item_ids`.

    exact: row = catalog index + 1, and row 0 (a zero vector that is never trained) for the
    catalog's cold items, so a cold item is scored from its content alone, in training, export and
    serving alike. hashed: blake2b buckets shared by colliding items.
    """
    fc = config.features
    if fc.item_ids == "hashed" and fc.hashed_id_buckets < 1:
        raise KarmaError("features.item_ids=hashed needs features.hashed_id_buckets > 0")
    if fc.item_ids != "hashed" and fc.hashed_id_buckets > 0:
        raise KarmaError(
            f"features.hashed_id_buckets={fc.hashed_id_buckets} is only read with features.item_ids=hashed "
            f"(it is {fc.item_ids!r})"
        )
    if fc.item_ids == "none" or not config.model.id_embedding:
        return None, 0, 0
    if fc.item_ids == "hashed":
        logger.info("item features: hashed item ids into %s buckets (seed %s)", fc.hashed_id_buckets, config.seed)
        return (
            hashed_id_buckets(catalog.item_ids, fc.hashed_id_buckets, seed=config.seed),
            fc.hashed_id_buckets,
            config.seed,
        )
    if catalog.n_items > EXACT_ID_MAX_ITEMS:
        raise KarmaError(
            f"features.item_ids=exact with {catalog.n_items:,} items (> {EXACT_ID_MAX_ITEMS:,}): "
            "use features.item_ids=hashed with features.hashed_id_buckets"
        )
    rows = np.arange(1, catalog.n_items + 1, dtype=np.int64)
    if catalog.cold is not None:
        rows[np.asarray(catalog.cold, dtype=bool)] = 0
    logger.info(
        "item features: exact item ids (%s rows; %s cold items get the zero 'no ID' row)",
        catalog.n_items + 1,
        int((rows == 0).sum()),
    )
    return rows, catalog.n_items + 1, 0


def build_item_features(catalog: Catalog, config: KarmaConfig, progress: bool = True) -> ItemFeatures:
    """Every item's frozen content features (cached encoders) and, if configured, its hashed-ID bucket."""
    fc = config.features
    cache = FeatureCache(config.paths.feature_cache)
    blocks: list[FeatureBlock] = []
    parts: list[np.ndarray] = []

    encoder = make_text_encoder(fc, progress=progress)
    logger.info("item features: text block %s (%s-d) for %s items", encoder.name, encoder.dim, catalog.n_items)
    text = cache.encode_texts(encoder, catalog.item_text())
    blocks.append(FeatureBlock(encoder.name, encoder.dim))
    parts.append(text.astype(np.float32, copy=False))

    if fc.use_visual:
        if catalog.visual is not None:
            visual = _visual_data_block(catalog)
            logger.info("item features: %s block (%s-d) from the data set", VISUAL_DATA_BLOCK, visual.shape[1])
            blocks.append(FeatureBlock(VISUAL_DATA_BLOCK, int(visual.shape[1])))
            parts.append(visual)
        if fc.image_dir is not None:
            name, images = _image_block(catalog, config, cache, progress)
            logger.info("item features: %s block (%s-d) from %s", name, images.shape[1], fc.image_dir)
            blocks.append(FeatureBlock(name, int(images.shape[1])))
            parts.append(images.astype(np.float32, copy=False))
        if catalog.visual is None and fc.image_dir is None:
            logger.info("item features: no visual block (the data set has no visual vectors and no image_dir is set)")
    elif catalog.visual is not None or fc.image_dir is not None:
        logger.info("item features: visual features available but features.use_visual is off; text only")

    id_buckets, id_rows, id_seed = item_id_rows(catalog, config)
    layout = FeatureLayout(
        blocks=tuple(blocks),
        id_buckets=id_rows,
        id_hash_seed=id_seed,
        id_scheme=fc.item_ids if id_rows else "hashed",
    )
    matrix = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    logger.info(
        "item features: %s items x %s dims, blocks %s",
        catalog.n_items,
        layout.dim,
        ", ".join(f"{b.name}({b.dim})" for b in layout.blocks),
    )
    return ItemFeatures(matrix=matrix, layout=layout, id_buckets=id_buckets)
