"""Contracts shared by training, export and service.

The item feature layout is the one thing all three must agree on byte for byte: training builds
the continuous tokens from it, export writes it into the bundle manifest, and the service
assembles `(B, L, F)` history tensors with it. It lives here, once, with no torch dependency.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Input/output names of the served ONNX graphs, spelt once: export names the graphs' inputs with
# them, training's batches and parity feed them, the service feeds them.
QUERY_IDS_INPUT = "query_ids"  # (batch, query tokens) int64 token ids
QUERY_MASK_INPUT = "query_mask"  # (batch, query tokens) int64, 1 = real token
HIST_FEATURES_INPUT = "hist_features"  # (batch, history, F) float32 frozen content features
HIST_MASK_INPUT = "hist_mask"  # (batch, history) int64, 1 = real item (histories are left-padded)
QUERY_INPUTS = (QUERY_IDS_INPUT, QUERY_MASK_INPUT, HIST_FEATURES_INPUT, HIST_MASK_INPUT)
QUERY_BUCKETS_INPUT = "hist_buckets"  # (batch, history) int64 item-ID rows, ID-aware bundles only
QUERY_OUTPUT = "h"  # (batch, D) float32 unit-length h_t
ITEM_INPUT = "features"  # (items, F) float32
ITEM_BUCKETS_INPUT = "id_buckets"  # (items,) int64 item-ID rows, ID-aware bundles only
ITEM_OUTPUT = "e"  # (items, D) float32 unit-length item embeddings


@dataclass(frozen=True)
class FeatureBlock:
    """One named slice of the item feature vector, e.g. ('text:minilm', 384)."""

    name: str
    dim: int


@dataclass(frozen=True)
class FeatureLayout:
    """Ordered blocks concatenated into each item's `F`-wide float32 content feature.

    `id_buckets > 0` means an int64 item-ID row travels beside the float features (it feeds a
    trained embedding table, so it is not part of `F`). `id_scheme` says how rows are assigned:
    `exact` (row = catalog index + 1; row 0 = "no ID", for cold items and items added later) or
    `hashed` (blake2b of the item id, `id_hash_seed` salted).
    """

    blocks: tuple[FeatureBlock, ...]
    id_buckets: int = 0
    id_hash_seed: int = 0
    id_scheme: str = "hashed"

    @property
    def dim(self) -> int:
        return sum(b.dim for b in self.blocks)

    def slice_of(self, name: str) -> slice:
        """Columns of block `name` inside the concatenated feature vector."""
        start = 0
        for block in self.blocks:
            if block.name == name:
                return slice(start, start + block.dim)
            start += block.dim
        raise KeyError(f"no feature block named {name!r}; have {[b.name for b in self.blocks]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "blocks": [asdict(b) for b in self.blocks],
            "dim": self.dim,
            "id_buckets": self.id_buckets,
            "id_hash_seed": self.id_hash_seed,
            "id_scheme": self.id_scheme,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureLayout:
        layout = cls(
            blocks=tuple(FeatureBlock(name=b["name"], dim=int(b["dim"])) for b in data["blocks"]),
            id_buckets=int(data.get("id_buckets", 0)),
            id_hash_seed=int(data.get("id_hash_seed", 0)),
            id_scheme=str(data.get("id_scheme", "hashed")),
        )
        if "dim" in data and int(data["dim"]) != layout.dim:
            raise ValueError(f"feature layout says dim {data['dim']} but its blocks add up to {layout.dim}")
        return layout
