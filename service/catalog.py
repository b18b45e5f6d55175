"""The served catalog: the bundle's items (read-only) plus the items `POST /items` added or replaced live.

Rows are stable: a bundle item keeps its bundle row for good, and an item added live gets the next
row past the last one (`LiveCatalog.size`), so histories (resolved id -> row per request), result
rows and index rows always agree. Replacing an item (an upsert of an id already served) overwrites
its features and vector under the same row. A deleted item leaves the index but keeps its row and
features: users who clicked it still carry its content in their history.

Writes happen on the encode thread (the one that runs batches), so a batch never sees a half-added
item; readers on the event loop (id resolution, result ids) read dicts and lists that a write only
appends to, and `RowStore` publishes each write as one new tuple.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GAP = "\x00gap"  # the id of a row this replica has not heard of yet (no client id can hold a NUL)


def _grown(array: np.ndarray, need: int) -> np.ndarray:
    """`array`, or a copy with room for `need` rows (capacity doubles: amortised O(1) per row)."""
    if need <= len(array):
        return array
    grown = np.zeros((max(16, 2 * need), *array.shape[1:]), dtype=array.dtype)
    grown[: len(array)] = array
    return grown


class RowStore:
    """Rows 0..N-1 from a read-only base array (often memory-mapped); rows past N from a dense growing array
    (row r at r - N); replaced base rows from a small side array. `store[rows]` gathers like numpy fancy
    indexing. A write costs O(rows written) (replacing a base row not replaced before also re-sorts the
    replaced rows' keys); each write publishes one new view tuple, so a reader never sees a half-made one."""

    def __init__(self, base: np.ndarray):
        self.base = base
        self.n_base = int(base.shape[0])
        empty = np.zeros((0, *base.shape[1:]), dtype=base.dtype)
        self._slot_of: dict[int, int] = {}  # replaced base row -> its slot in the side array
        # (live rows array, live rows used, sorted replaced base rows, their slots, the side array)
        self._view: tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray] = (
            empty, 0, np.zeros(0, np.int64), np.zeros(0, np.int64), empty,
        )  # fmt: skip

    def set_rows(self, rows: Sequence[int], values: np.ndarray) -> None:
        """Write `values[i]` as row `rows[i]` (new rows past the base, or replacements of base rows)."""
        live, n_live, keys, slots, side = self._view
        values = np.asarray(values, dtype=self.base.dtype)
        at = np.asarray(rows, dtype=np.int64)
        past = at >= self.n_base
        if past.any():
            n_live = max(n_live, int(at[past].max()) - self.n_base + 1)
            live = _grown(live, n_live)  # new rows are written past every published view's count
            live[at[past] - self.n_base] = values[past]
        if (~past).any():
            fresh = [int(r) for r in dict.fromkeys(at[~past].tolist()) if int(r) not in self._slot_of]
            side = _grown(side, len(self._slot_of) + len(fresh))
            for row in fresh:
                self._slot_of[row] = len(self._slot_of)
            for row, value in zip(at[~past].tolist(), values[~past], strict=True):
                side[self._slot_of[row]] = value
            if fresh:
                keys = np.fromiter(sorted(self._slot_of), dtype=np.int64, count=len(self._slot_of))
                slots = np.fromiter((self._slot_of[int(k)] for k in keys), dtype=np.int64, count=len(keys))
        self._view = (live, n_live, keys, slots, side)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        live, n_live, keys, slots, side = self._view
        if not n_live and not len(keys):
            return self.base[rows]
        rows = np.asarray(rows, dtype=np.int64)
        past = rows >= self.n_base
        out = self.base[np.where(past, 0, rows)]  # rows held elsewhere read base row 0, then are overwritten
        if past.any():
            out[past] = live[rows[past] - self.n_base]
        if len(keys):
            at = np.minimum(np.searchsorted(keys, rows), len(keys) - 1)
            own = (keys[at] == rows) & ~past
            if own.any():
                out[own] = side[slots[at[own]]]
        return out


class LiveCatalog:
    """Item ids, titles, features and ID rows of every served item, bundle and live."""

    def __init__(
        self,
        item_ids: list[str],
        titles: list[str | None] | None,
        features: np.ndarray,
        id_rows: np.ndarray | None,
        embeddings: np.ndarray,
    ):
        self.n_base = len(item_ids)
        self.item_ids = item_ids
        self.titles = titles
        self.row_of: dict[str, int] = {item: row for row, item in enumerate(item_ids)}
        self.features = RowStore(features)
        self.id_rows = RowStore(id_rows) if id_rows is not None else None
        self.embeddings = RowStore(embeddings)
        self.deleted: set[int] = set()  # rows not to answer: deleted items, and gaps (rows not heard of yet)
        self.deleted_rows = np.zeros(0, dtype=np.int64)  # the same, sorted, for np.isin on result rows
        self.replaced_rows: set[int] = set()  # bundle items whose features and vector were replaced live

    @property
    def size(self) -> int:
        """Rows this replica can name: the bundle's plus the live items it knows."""
        return len(self.item_ids)

    def put(
        self,
        rows: Sequence[int],
        item_ids: Sequence[str],
        titles: Sequence[str | None],
        features: np.ndarray,
        id_rows: np.ndarray | None,
        vectors: np.ndarray,
    ) -> None:
        """Record items at `rows` (idempotent: the same record twice is the same state); rows skipped on the way
        (another replica's items, not heard of yet) are gaps, never answered until their own record arrives.

        Checked whole before anything changes, and the data is written before the ids are published, so a
        reader on the event loop never resolves an id whose row has no features or vector yet.
        """
        for row, item in zip(rows, item_ids, strict=True):
            held = self.item_ids[row] if row < len(self.item_ids) else GAP
            if held not in (GAP, item):
                raise ValueError(f"row {row} holds item {held!r}, not {item!r}")
        self.features.set_rows(rows, features)
        if self.id_rows is not None and id_rows is not None:
            self.id_rows.set_rows(rows, id_rows)
        self.embeddings.set_rows(rows, vectors)
        for row, item, title in zip(rows, item_ids, titles, strict=True):
            while row > len(self.item_ids):  # another replica's row not heard of yet (shared index): a gap
                self.deleted.add(len(self.item_ids))
                self.item_ids.append(GAP)
                if self.titles is not None:
                    self.titles.append(None)
            if row == len(self.item_ids):
                self.item_ids.append(item)
                if self.titles is not None:
                    self.titles.append(title)
            else:
                if self.item_ids[row] == GAP:
                    self.item_ids[row] = item
                if self.titles is not None:
                    self.titles[row] = title
            if row < self.n_base:
                self.replaced_rows.add(row)
            self.row_of[item] = row
            self.deleted.discard(row)
        self._publish_deleted()

    def delete(self, row: int) -> None:
        self.deleted.add(row)
        self._publish_deleted()

    def _publish_deleted(self) -> None:
        self.deleted_rows = np.fromiter(sorted(self.deleted), dtype=np.int64, count=len(self.deleted))

    def describe(self) -> dict[str, int]:
        gaps = sum(1 for row in self.deleted if self.item_ids[row] == GAP)
        return {
            "bundle_items": self.n_base,
            "added_live": self.size - self.n_base - gaps,
            "replaced_live": len(self.replaced_rows),
            "deleted": len(self.deleted) - gaps,
            "not_heard_of_yet": gaps,
            "searchable": self.size - len(self.deleted),
        }
