"""The candidate pool of the exact (whole-catalog) action softmax.

`loss.negatives=catalog` (or `auto` on a catalog of at most `loss.catalog_max_items`) scores every
supervised position against every item that exists at training time: the catalog minus its cold
items, which stand for items that arrive after training and so must not be pushed down as
never-clicked negatives. With `loss.catalog_refresh_every=1` the item tower runs over the pool
every step, so every item's embedding gets the gradient of being a negative; with N > 1 the
negatives come from a no-grad cache rebuilt every N steps, with the batch's clicked items embedded
fresh in their own columns (so they are pushed up as positives and down as negatives), which is
cheaper where the item tower over the pool dominates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from training.setup import Setup, to_device


class CatalogNegatives:
    """Pool inputs, the item -> pool-column map and the optional no-grad embedding cache."""

    def __init__(self, setup: Setup, pool: np.ndarray, device: torch.device):
        self.pool = pool
        self.refresh_every = setup.config.loss.catalog_refresh_every
        cols = torch.full((setup.dataset.catalog.n_items,), -1, dtype=torch.long)
        cols[torch.from_numpy(pool)] = torch.arange(len(pool))
        self.cols = cols.to(device)
        self.inputs = to_device(setup.batcher.item_inputs(torch.from_numpy(pool)), device)
        self._cache: torch.Tensor | None = None
        self._cache_block = -1

    @classmethod
    def for_setup(cls, setup: Setup, device: torch.device) -> CatalogNegatives | None:
        """The pool when the config asks for the catalog softmax (directly or by `auto`), else None."""
        loss = setup.config.loss
        cold = setup.dataset.catalog.cold
        n = setup.dataset.catalog.n_items
        pool = np.flatnonzero(~np.asarray(cold, dtype=bool)) if cold is not None else np.arange(n)
        if loss.act != "softmax" or loss.negatives == "sampled":
            return None
        if loss.negatives == "auto" and len(pool) > loss.catalog_max_items:
            return None
        return cls(setup, pool.astype(np.int64), device)

    def describe(self) -> str:
        how = "item tower every step" if self.refresh_every == 1 else f"no-grad cache every {self.refresh_every} steps"
        return f"exact softmax over {len(self.pool):,} items ({how})"

    def for_step(self, model: torch.nn.Module, action_step: int) -> dict[str, Any]:
        """The `catalog` argument of `KarmaModel.forward` for this action step."""
        if self.refresh_every == 1:
            return {"cols": self.cols, "inputs": self.inputs}
        block = action_step // self.refresh_every
        if self._cache is None or block != self._cache_block:
            with torch.no_grad():
                keep = model.id_keep((len(self.pool),), self.cols.device, None)  # as for fresh negatives
                self._cache = model.item_tower(**self.inputs, id_keep=keep).detach()
            self._cache_block = block
        return {"cols": self.cols, "emb": self._cache, "item_inputs": self.column_inputs}

    def column_inputs(self, columns: torch.Tensor) -> dict[str, torch.Tensor]:
        """Item-tower inputs of the pool items in `columns` (fresh embeddings over the cache)."""
        return {k: v[columns] for k, v in self.inputs.items()}
