"""The in-memory data contract: a catalog of items and a log of click events.

Both are columnar (numpy arrays and one pandas frame for item text) so that 1M items and 1M events
fit comfortably in memory and every downstream step (split, features, training batches) works with
integer indices, never with string ids. String ids are kept once, in the catalog and user table,
for I/O.

Loaders (`recbole`, `taobao`, `synthetic`) build these objects; `validate` checks raw tables
before they get here, so everything in a `Dataset` is already consistent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from karma.text_features import join_item_text

SCHEMA_VERSION = 1


@dataclass
class Catalog:
    """Items: ids, text fields and optional frozen visual vectors, all row-aligned.

    Row `i` of `items`, `visual` and `cold` describe the same item; that row number is the item's
    index everywhere else (`Interactions.item_idx`, feature matrices, FAISS ids).
    """

    items: pd.DataFrame  # column `item_id` (str, unique) + one str column per text field
    text_fields: tuple[str, ...]  # which columns of `items` make up the item text, in order
    visual: np.ndarray | None = None  # (n_items, V) float32 frozen visual/content vector, or None
    cold: np.ndarray | None = None  # (n_items,) bool: held out of training (only test targets)

    def __post_init__(self) -> None:
        if self.cold is None:
            self.cold = np.zeros(len(self.items), dtype=bool)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def item_ids(self) -> np.ndarray:
        return self.items["item_id"].to_numpy()

    def item_text(self) -> list[str]:
        """One string per item: 'field: value' pairs joined, so that the text encoder sees labels."""
        if not self.text_fields:
            return [""] * self.n_items
        columns = [self.items[f].fillna("").astype(str).to_numpy() for f in self.text_fields]
        return [join_item_text(self.text_fields, values) for values in zip(*columns, strict=True)]


@dataclass
class Interactions:
    """Click events in file order (row `e` is the e-th event of the input).

    Chronological order is *not* assumed: the splitter sorts by (user, timestamp, file row), so
    ties in timestamp keep file order, which is what MovieLens needs.
    """

    user_ids: np.ndarray  # (n_users,) str: external id of each user index
    user_idx: np.ndarray  # (n_events,) int32 into user_ids
    item_idx: np.ndarray  # (n_events,) int32 into the catalog rows
    timestamp: np.ndarray  # (n_events,) int64 seconds since the epoch
    query: np.ndarray | None = None  # (n_events,) object: query text or None
    exposed_offsets: np.ndarray | None = None  # (n_events + 1,) int64 into exposed_items
    exposed_items: np.ndarray | None = None  # int32 item indices shown but not clicked

    @property
    def n_events(self) -> int:
        return len(self.item_idx)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def exposed_of(self, event: int) -> np.ndarray:
        """Items shown but not clicked at `event` (empty when the data has none)."""
        if self.exposed_offsets is None or self.exposed_items is None:
            return np.zeros(0, dtype=np.int32)
        return self.exposed_items[self.exposed_offsets[event] : self.exposed_offsets[event + 1]]


@dataclass
class Dataset:
    """A named catalog + interactions pair, with where it came from."""

    name: str
    catalog: Catalog
    interactions: Interactions
    meta: dict[str, Any] = field(default_factory=dict)  # provenance: source files, config, seed

    def save(self, directory: Path) -> None:
        """Write to `directory` as parquet + npy, readable by `Dataset.load`."""
        directory.mkdir(parents=True, exist_ok=True)
        cat = self.catalog
        items = cat.items.copy()
        items["cold"] = cat.cold
        pq.write_table(pa.Table.from_pandas(items, preserve_index=False), directory / "catalog.parquet")
        if cat.visual is not None:
            np.save(directory / "visual.npy", cat.visual)
        inter = self.interactions
        columns: dict[str, Any] = {
            "user_idx": pa.array(inter.user_idx),
            "item_idx": pa.array(inter.item_idx),
            "timestamp": pa.array(inter.timestamp),
        }
        if inter.query is not None:
            columns["query"] = pa.array(inter.query, type=pa.string())
        if inter.exposed_offsets is not None and inter.exposed_items is not None:
            columns["exposed"] = pa.ListArray.from_arrays(
                pa.array(inter.exposed_offsets.astype(np.int32)), pa.array(inter.exposed_items)
            )
        pq.write_table(pa.table(columns), directory / "interactions.parquet")
        pq.write_table(pa.table({"user_id": pa.array(inter.user_ids, type=pa.string())}), directory / "users.parquet")
        meta = {"schema_version": SCHEMA_VERSION, "name": self.name, "text_fields": list(cat.text_fields), **self.meta}
        (directory / "dataset.json").write_text(json.dumps(meta, indent=2, default=str))

    @classmethod
    def load(cls, directory: Path) -> Dataset:
        meta = json.loads((directory / "dataset.json").read_text())
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{directory}: dataset schema {meta.get('schema_version')} != {SCHEMA_VERSION}")
        items = pq.read_table(directory / "catalog.parquet").to_pandas()
        cold = items.pop("cold").to_numpy(dtype=bool)
        visual_path = directory / "visual.npy"
        visual = np.load(visual_path) if visual_path.exists() else None
        catalog = Catalog(items=items, text_fields=tuple(meta.pop("text_fields")), visual=visual, cold=cold)
        table = pq.read_table(directory / "interactions.parquet")
        query = table.column("query").to_numpy(zero_copy_only=False) if "query" in table.column_names else None
        exposed_offsets = exposed_items = None
        if "exposed" in table.column_names:
            exposed = table.column("exposed").combine_chunks()
            exposed_offsets = exposed.offsets.to_numpy().astype(np.int64)
            exposed_items = exposed.values.to_numpy().astype(np.int32)
        users = pq.read_table(directory / "users.parquet").column("user_id").to_numpy(zero_copy_only=False)
        interactions = Interactions(
            user_ids=users.astype(object),
            user_idx=table.column("user_idx").to_numpy().astype(np.int32),
            item_idx=table.column("item_idx").to_numpy().astype(np.int32),
            timestamp=table.column("timestamp").to_numpy().astype(np.int64),
            query=query,
            exposed_offsets=exposed_offsets,
            exposed_items=exposed_items,
        )
        name = meta.pop("name")
        meta.pop("schema_version")
        return cls(name=name, catalog=catalog, interactions=interactions, meta=meta)
