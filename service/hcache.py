"""An optional cache of h_t (`serve.h_cache_entries`): a user without a new click skips the query encoder.

The key is what the encoder reads: the query text and the history rows as the model sees them (the
newest `max_history`, oldest first). So a new click (`POST /events`) is a new key, never a stale
hit; a reload brings a new engine and an empty cache (the model version is the engine's); and items
changed live (`POST /items`, a replica's registry record) clear it, because a replaced item's
features change h_t for every history that holds it. Least recently used entries go first.
Taobao-style near-line user embeddings, kept exact: a hit returns the very vector the encoder gave.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np


class HCache:
    """LRU of (h_t, query token count) by (query, history rows); safe to use from several threads."""

    def __init__(self, entries: int, on_lookup: Callable[[bool], None] | None = None):
        self.entries = entries
        self._store: OrderedDict[tuple[str, bytes], tuple[np.ndarray, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._on_lookup = on_lookup  # e.g. a metrics counter: called with True for a hit
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(query: str, history: np.ndarray) -> tuple[str, bytes]:
        return query, np.ascontiguousarray(history, dtype=np.int64).tobytes()

    def get(self, query: str, history: np.ndarray) -> tuple[np.ndarray, int] | None:
        key = self.key(query, history)
        with self._lock:
            found = self._store.get(key)
            if found is not None:
                self._store.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        if self._on_lookup is not None:
            self._on_lookup(found is not None)
        return found

    def put(self, query: str, history: np.ndarray, h: np.ndarray, query_tokens: int) -> None:
        key = self.key(query, history)
        with self._lock:
            self._store[key] = (np.array(h, dtype=np.float32, copy=True), query_tokens)
            self._store.move_to_end(key)
            while len(self._store) > self.entries:
                self._store.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._store.clear()

    def __len__(self) -> int:
        return len(self._store)

    def describe(self) -> dict[str, int | float]:
        looked = self.hits + self.misses
        return {
            "entries": self.entries,
            "held": len(self),
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / looked, 4) if looked else 0.0,
        }
