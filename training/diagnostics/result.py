"""`ModelDiagnostics`, one model's diagnostics (what the runner fills, the report prints, the plots draw)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from karma.jsonable import to_jsonable
from training.diagnostics.attention import AttentionMap
from training.diagnostics.metrics import ATTENTION_METRICS

log = logging.getLogger("training.diagnostics")


@dataclass
class ModelDiagnostics:
    name: str
    checkpoint: str
    preset: str
    recon_trained: bool
    protocol: dict[str, Any]
    per_layer: dict[str, np.ndarray]  # metric -> (layers, heads), mean over users
    reference_per_layer: dict[str, np.ndarray]  # metric -> (layers,), uniform causal attention
    scalars: dict[str, float]
    references: dict[str, float]
    notes: list[str] = field(default_factory=list)
    maps: list[AttentionMap] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Flat {row name: value} of the table: attention metrics mean-over-layers and last layer, then scalars."""
        out: dict[str, float] = {}
        for name in ATTENTION_METRICS:
            values = self.per_layer[name]
            out[f"{name} · mean over layers"] = nanmean(values)
            out[f"{name} · last layer"] = nanmean(values[-1])
        out.update(self.scalars)
        return out

    def to_json(self) -> dict[str, Any]:
        """Everything, maps included, as strict-JSON-ready values (`from_json` restores it)."""
        return to_jsonable(
            {
                **{k: getattr(self, k) for k in ("name", "checkpoint", "preset", "recon_trained", "protocol")},
                **{k: getattr(self, k) for k in ("per_layer", "reference_per_layer", "scalars", "references", "notes")},
                "maps": [
                    {"user": m.user, "position": m.position, "n_query": m.n_query, "n_history": m.n_history,
                     "layers": m.layers, "history_first": m.history_first}
                    for m in self.maps
                ],
            }
        )  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelDiagnostics:
        def floats(values: Any) -> np.ndarray:
            return np.asarray([[math.nan if v is None else v for v in row] if isinstance(row, list) else
                               (math.nan if row is None else row) for row in values], dtype=np.float64)  # fmt: skip

        def number(v: Any) -> float:
            return math.nan if v is None else float(v)

        maps = [
            AttentionMap(
                user=int(m["user"]),
                position=int(m["position"]),
                n_query=int(m["n_query"]),
                n_history=int(m["n_history"]),
                history_first=bool(m.get("history_first", False)),
                layers=[np.asarray(layer, dtype=np.float64) for layer in m["layers"]],
            )
            for m in data.get("maps", [])
        ]
        return cls(
            name=data["name"],
            checkpoint=data["checkpoint"],
            preset=data["preset"],
            recon_trained=bool(data["recon_trained"]),
            protocol=dict(data["protocol"]),
            per_layer={k: floats(v) for k, v in data["per_layer"].items()},
            reference_per_layer={k: floats(v) for k, v in data["reference_per_layer"].items()},
            scalars={k: number(v) for k, v in data["scalars"].items()},
            references={k: number(v) for k, v in data["references"].items()},
            notes=list(data.get("notes", [])),
            maps=maps,
        )

    def reference_summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in ATTENTION_METRICS:
            values = self.reference_per_layer[name]
            out[f"{name} · mean over layers"] = nanmean(values)
            out[f"{name} · last layer"] = nanmean(values[-1:])
        out.update(self.references)
        return out


def nanmean(x: np.ndarray | Tensor) -> float:
    arr = np.asarray(x, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return float(finite.mean()) if finite.size else math.nan


class NanMean:
    """Running mean over users that skips NaN entries (per element)."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count: Tensor | None = None

    def add(self, values: Tensor) -> None:  # (B, ...) -> accumulates over B
        finite = torch.isfinite(values)
        s = torch.where(finite, values, torch.zeros_like(values)).sum(0).double()
        c = finite.sum(0).double()
        self.total = s if self.total is None else self.total + s
        self.count = c if self.count is None else self.count + c

    def value(self) -> np.ndarray:
        if self.total is None or self.count is None:
            return np.array(math.nan)
        return torch.where(self.count > 0, self.total / self.count.clamp(min=1), math.nan).cpu().numpy()
