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


class RowStore:
    """Rows 0..N-1 from a read-only base array (often memory-mapped); rows past N, and replaced base rows,
    from a growing in-memory array. `store[rows]` gathers like numpy fancy indexing."""

    def __init__(self, base: np.ndarray):
        self.base = base
        self.n_base = int(base.shape[0])
        empty = np.zeros((0, *base.shape[1:]), dtype=base.dtype)
        self._slot_of: dict[int, int] = {}
        # (sorted rows with an own slot, their slots, the slot array): replaced as a whole on every write
        self._view: tuple[np.ndarray, np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, np.int64), empty)

    def __len__(self) -> int:
        return max(self.n_base, max(self._slot_of, default=-1) + 1)

    def set_rows(self, rows: Sequence[int], values: np.ndarray) -> None:
        """Write `values[i]` as row `rows[i]` (new rows past the base, or replacements of base rows)."""
        _, _, extra = self._view
        values = np.asarray(values, dtype=self.base.dtype)
        new = [r for r in dict.fromkeys(int(r) for r in rows) if r not in self._slot_of]
        used = len(self._slot_of)
        if used + len(new) > len(extra):  # grow by doubling: amortised O(1) per row
            grown = np.zeros((max(16, 2 * (used + len(new))), *self.base.shape[1:]), dtype=self.base.dtype)
            grown[:used] = extra[:used]
            extra = grown
        for i, row in enumerate(new):
            self._slot_of[row] = used + i
        for i, row in enumerate(rows):  # new slots are past every published view; replacements overwrite in place
            extra[self._slot_of[int(row)]] = values[i]
        keys = np.fromiter(sorted(self._slot_of), dtype=np.int64, count=len(self._slot_of))
        slots = np.fromiter((self._slot_of[int(k)] for k in keys), dtype=np.int64, count=len(keys))
        self._view = (keys, slots, extra)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        keys, slots, extra = self._view
        if not len(keys):
            return self.base[rows]
        rows = np.asarray(rows, dtype=np.int64)
        at = np.minimum(np.searchsorted(keys, rows), len(keys) - 1)
        own = keys[at] == rows
        out = self.base[np.where(own, 0, rows)]  # rows with an own slot read base row 0, then are overwritten
        if own.any():
            out[own] = extra[slots[at[own]]]
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
        self.deleted: set[int] = set()
        self.added = 0  # items added live (rows past the bundle's)
        self.replaced = 0  # bundle items whose features and vector were replaced

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
        """Record items at `rows`; rows skipped on the way (another replica's items, not heard of yet) are gaps,
        deleted until their own record arrives."""
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
                self.added += 1
            else:
                held = self.item_ids[row]
                if held == GAP:
                    self.item_ids[row] = item
                    self.added += 1
                elif held != item:
                    raise ValueError(f"row {row} holds item {held!r}, not {item!r}")
                elif row < self.n_base and row not in self.deleted:
                    self.replaced += 1
                if self.titles is not None:
                    self.titles[row] = title
            self.row_of[item] = row
            self.deleted.discard(row)
        self.features.set_rows(rows, features)
        if self.id_rows is not None and id_rows is not None:
            self.id_rows.set_rows(rows, id_rows)
        self.embeddings.set_rows(rows, vectors)

    def delete(self, row: int) -> None:
        self.deleted.add(row)

    def describe(self) -> dict[str, int]:
        return {
            "bundle_items": self.n_base,
            "added_live": self.added,
            "replaced_live": self.replaced,
            "deleted": len(self.deleted),
            "searchable": self.size - len(self.deleted),
        }
