"""The Python API: rank items for a query and/or click history from a bundle, without HTTP.

    from service.searcher import Searcher

    searcher = Searcher("artifacts/bundles/default")
    hits = searcher.search(query="red running shoes", history=["i0000042", "i0000077"], k=10)
    h = searcher.embed(query="gift mug", history=["i0000042"])   # the next-interest embedding h_t

It runs the serving path itself (`service.engine.Engine`: the same featurisation, ONNX encoder,
FAISS search and exclusions as `POST /search`, in the calling thread), so a notebook or another
service gets exactly the ranking the HTTP service would give. Torch-free, like the service.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from karma.errors import KarmaError
from service.engine import Engine, Job


@dataclass(frozen=True)
class Hit:
    """One ranked item: its id, the inner product of h_t and its embedding, and its title (if the bundle has one)."""

    item_id: str
    score: float
    title: str | None


class Searcher:
    """A loaded, validated bundle with open ONNX Runtime sessions (CPU unless `providers` says otherwise)."""

    def __init__(self, bundle: Path | str, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 1):
        self.engine = Engine.load(bundle, list(providers), threads)
        self.engine.probe()

    @property
    def model_version(self) -> str:
        return self.engine.model_version

    def _job(self, query: str, history: Sequence[str], k: int, exclude_history: bool, strict: bool) -> Job:
        rows, unknown = self.engine.resolve([str(item) for item in history])
        if unknown and (strict or not (rows or query.strip())):  # skipped as POST /search skips them, unless strict
            raise KarmaError(f"{len(unknown)} history item(s) not in this bundle's catalog, first: {unknown[0]!r}")
        if not rows and not query.strip():
            raise KarmaError("nothing to search with: give a query, a history, or both")
        return self.engine.make_job(query.strip(), rows, k, exclude_history)  # as POST /search builds it

    def search(
        self,
        query: str = "",
        history: Sequence[str] = (),
        k: int = 10,
        exclude_history: bool = False,
        strict: bool = False,
    ) -> list[Hit]:
        """The top-k items for a query and/or a click history (oldest first), best first.

        History ids the bundle does not know are skipped, as `POST /search` skips them (`strict=True`
        refuses them instead); with none left and no query it is a KarmaError.
        """
        if not 1 <= k <= self.engine.n_items:
            raise KarmaError(f"k must be between 1 and the catalog size {self.engine.n_items}, got {k}")
        result = self.engine.run_batch([self._job(query, history, k, exclude_history, strict)])[0]
        titles = self.engine.titles
        return [
            Hit(self.engine.item_ids[r], float(s), titles[r] if titles is not None else None)
            for r, s in zip(result.rows.tolist(), result.scores.tolist(), strict=True)
        ]

    def embed(self, query: str = "", history: Sequence[str] = (), strict: bool = False) -> np.ndarray:
        """h_t, the unit-length next-interest embedding (float32, embed_dim) the index is searched with
        (what `POST /embed` returns; unknown history ids are handled as in `search`)."""
        result = self.engine.run_batch([self._job(query, history, 0, False, strict)])[0]
        assert result.embedding is not None
        return result.embedding

    def item_vectors(self, item_ids: Sequence[str]) -> np.ndarray:
        """The bundle's item embeddings for `item_ids` (float32, len x embed_dim), as the index holds them."""
        rows, missing = self.engine.resolve([str(item) for item in item_ids])
        if missing:
            raise KarmaError(f"{len(missing)} item(s) not in this bundle's catalog, first: {missing[0]!r}")
        return self.engine.item_vectors(rows)
