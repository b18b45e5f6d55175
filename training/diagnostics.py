"""Collapse diagnostics for trained KARMA models (`karma diagnose`; DESIGN.md §1, "semantic collapse").

Action-only fine-tuning is said to collapse the LLM into an ID matcher: attention piles onto a
few history positions (vertical "barcode" stripes, an attention sink), `h_t` spans few
directions, and the item text can no longer be read out of `h_t`. This module measures each
symptom on `n_users` test users of a checkpoint, under the evaluation protocol, so that an
action-only run and a KARMA run can be put side by side.

Notation (one user, one layer, one head). The query tower's sequence is
`[history items][query tokens][EMB]` (padding may sit before a short history and after a short
query). `A` (S x S) is the eager softmax attention of that head, row `i` = query position,
column `j` = key position; rows sum to 1 over the valid keys `j <= i`.

* `V`: valid (non-padding) positions. `Hist` ⊂ V: the history-item positions. `e`: the [EMB]
  position (the last one; its hidden state becomes `h_t`). `f = min V`: the first valid position,
  where LLMs park unused attention (the attention-sink position: the oldest history item, or the
  first query token when the history is empty).
* `R = Hist ∪ {e}`: the history rows and [EMB] (query-token rows are left out, so the measure
  is comparable with maps of the older query-first tower, where they could not see the history).

Attention metrics (each computed per user, layer and head, then averaged over users; users where
a metric is undefined, e.g. an empty history, are skipped):

* `emb_top_column_mass` = max_{j∈Hist} A[e, j] / Σ_{j∈Hist} A[e, j]: of the attention [EMB] pays to
  history, the share on the single most-attended history item. Range [1/|Hist|, 1]; 1 = one item
  takes all of it.
* `rows_top_column_mass` = max_{j∈Hist} c_j / Σ_{j∈Hist} c_j with column totals
  c_j = Σ_{i∈R} A[i, j]: the same share for the history attention of all rows in R summed (the
  brightest vertical stripe of the attention map's history block). Range [1/|Hist|, 1]; earlier
  columns are visible to more rows, so even uniform causal attention favours the oldest item.
* `emb_entropy` = −Σ_{j∈V} p_j log p_j / log|V| with p = A[e, V] (renormalised over V): the
  normalised entropy of the [EMB] row. Range [0, 1]; 1 = uniform over valid keys, 0 = one key.
* `row_consistency` ("barcode" score) = mean over ordered pairs i ≠ k of R of
  cos(A[i, V], A[k, V]) (keys hidden by causal masking are 0): high when every row attends to the
  same columns, i.e. vertical stripes. Range [0, 1] (attention is non-negative).
* `emb_first_token_mass` = A[e, f]; `rows_first_token_mass` = mean_{i∈R} A[i, f]: the mass on the
  attention-sink position. Range [0, 1].

Summaries: "mean over layers" averages the (layer, head) table over layers and heads; "last layer"
averages the heads of the last layer (the one whose output becomes `h_t`). The *reference* is the
same metric on uniform causal attention (row i spreads 1/|{j ∈ V: j <= i}| over its visible valid
keys) for the same users: what "no preference at all" gives, since several metrics are not 0 for it.

Representation and semantics:

* `effective_rank`: participation ratio (Σλ)² / Σλ² of the eigenvalues λ of the covariance of the
  (U, D) matrix of `h_t` (centred over users, divided by U − 1). Range [1, min(D, U − 1)]; D = all
  directions used equally. `effective_rank_ratio` = effective_rank / D.
* `h_mean_cosine`: mean over pairs of distinct users of cos(h_u, h_v) = (|Σ_u h_u|² − U) / (U(U − 1))
  for unit h. Range [−1/(U − 1), 1]; 1 = every user gets the same h_t (the tower ignores its input
  and ranks everyone alike, e.g. by popularity); reference 0 (random directions). Effective rank
  measures the spread *around* the mean; this one measures how much of h_t the mean is.
* `hr@200_own_h`, `hr@200_shared_h`: HR@200 of the diagnosed users with their own `h_t`, and with
  every one of them given the same vector (the normalised mean of their `h_t`), under the protocol's
  exclusions. Equal numbers: the ranking owes nothing to the user (a global, popularity-like order);
  the gap is what personalisation adds. No reference (both are measured).
* `recon_token_accuracy`, `recon_loss`: decode the target item's text from the single soft prefix
  token `proj(h_t)` (`model.heads.recon_prefix`, then `model.decode_text_loss`, teacher-forced):
  next-token argmax accuracy and cross-entropy (nats/token) over the text tokens and EOS, pooled over
  all tokens of all users (token-weighted). When the run's preset has λ_recon = 0 the head was never
  trained: the number is still reported, flagged "head untrained (preset has no L_recon)".
* `category_jaccard@K` (K = 50): per user u, the top-K items T_u by h_u·e_j over the whole catalog
  after the protocol's exclusions (full history excluded, target kept), and
  (1/|T_u|) Σ_{j∈T_u} |C(j) ∩ C(t_u)| / |C(j) ∪ C(t_u)|: the mean item-vs-target Jaccard of the
  category sets C (MovieLens: the `genres` field split on spaces; synthetic/Taobao: the `category`
  field as one label, where the number is the share of the top-K in the target's category). Users
  whose target has no category are skipped. Reference: the same expectation for a uniformly random
  catalog item (the catalog prior).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from karma.errors import KarmaError
from karma.jsonable import to_jsonable
from training.evaluation import eval_targets
from training.evaluation.protocol import EvalTargets
from training.losses import IGNORE_INDEX
from training.setup import Setup, embed_items, to_device

log = logging.getLogger(__name__)

JACCARD_K = 50
PERSONAL_K = 200  # K of the own-h vs shared-h hit rates (the paper's headline K)
ATTENTION_METRICS = (
    "emb_top_column_mass",
    "rows_top_column_mass",
    "emb_entropy",
    "row_consistency",
    "emb_first_token_mass",
    "rows_first_token_mass",
)
METRIC_LABELS = {
    "emb_top_column_mass": "[EMB] top history-column share",
    "rows_top_column_mass": "all-rows top history-column share",
    "emb_entropy": "[EMB] attention entropy / log n_valid",
    "row_consistency": "row consistency (barcode)",
    "emb_first_token_mass": "[EMB] mass on first token",
    "rows_first_token_mass": "all-rows mass on first token",
    "effective_rank": "effective rank of h_t (PR)",
    "effective_rank_ratio": "effective rank / D",
    "h_mean_cosine": "mean cosine between users' h_t",
    "recon_token_accuracy": "L_recon token accuracy",
    "recon_loss": "L_recon cross-entropy (nats/token)",
    f"category_jaccard@{JACCARD_K}": f"category Jaccard@{JACCARD_K}",
    f"hr@{PERSONAL_K}_own_h": f"HR@{PERSONAL_K} of the diagnosed users, own h_t",
    f"hr@{PERSONAL_K}_shared_h": f"HR@{PERSONAL_K} of the same users, all given the mean h_t",
}
UNTRAINED_RECON = "head untrained (preset has no L_recon)"
JSON_FILE = "diagnostics.json"
LAYER_PLOT = "attention_by_layer.png"
MAPS_PLOT = "attention_maps.png"


# ---- metric functions (pure; unit-tested on hand-built tensors) --------------------------------


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.full_like(num, math.nan))


def top_column_mass(weights: Tensor, columns: Tensor) -> Tensor:
    """max_j w_j / Σ_j w_j over the columns marked True: (..., S), (..., S) bool -> (...). NaN if no mass."""
    w = weights.float() * columns.to(torch.float32)
    return _safe_div(w.amax(dim=-1), w.sum(dim=-1))


def normalized_entropy(probs: Tensor, valid: Tensor) -> Tensor:
    """−Σ p log p / log n over the valid keys (p renormalised over them): (..., S) -> (...) in [0, 1].

    NaN where fewer than two keys are valid (the entropy of one outcome has no scale).
    """
    p = probs.float() * valid.to(torch.float32)
    p = p / p.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    h = -(p * torch.log(p.clamp(min=1e-30))).sum(dim=-1)
    n = valid.sum(dim=-1).to(torch.float32)
    return _safe_div(h, torch.log(n.clamp(min=1.0))).clamp(max=1.0)


def first_valid_index(valid: Tensor) -> Tensor:
    """Index of the first True along the last axis: (..., S) bool -> (...) int64 (0 if none)."""
    return valid.to(torch.int8).argmax(dim=-1)


def first_token_mass(probs: Tensor, valid: Tensor) -> Tensor:
    """Mass on the first valid key: probs (..., S), valid (..., S) -> (...)."""
    first = first_valid_index(valid).unsqueeze(-1)
    probs = probs.float()
    first = first.expand(*probs.shape[:-1], 1) if first.dim() == probs.dim() else first
    return probs.gather(-1, first).squeeze(-1)


def row_consistency(attn: Tensor, rows: Tensor, keys: Tensor) -> Tensor:
    """Mean pairwise cosine similarity between the attention rows in `rows`, over the `keys` axis.

    attn (..., S, S) (rows = queries), rows (..., S) bool, keys (..., S) bool -> (...). NaN where
    fewer than two rows are selected.
    """
    a = attn.float() * keys.unsqueeze(-2).to(torch.float32) * rows.unsqueeze(-1).to(torch.float32)
    a = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    gram = a @ a.transpose(-1, -2)
    n = rows.sum(dim=-1).to(torch.float32)
    off_diagonal = gram.sum(dim=(-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    return _safe_div(off_diagonal, n * (n - 1))


def attention_metrics(attn: Tensor, valid: Tensor, history: Tensor) -> dict[str, Tensor]:
    """Every attention metric of the module docstring for one layer.

    attn (B, H, S, S) eager attention; valid (B, S) non-padding positions; history (B, S) the
    history-item positions (a subset of valid). The [EMB] row is the last position. Returns
    {name: (B, H)} (NaN where undefined for a user).
    """
    valid = valid.bool()
    history = history.bool() & valid
    rows = history.clone()
    rows[:, -1] = True  # R = Hist ∪ {EMB}
    v4, h4 = valid[:, None, :], history[:, None, :]
    emb = attn[:, :, -1, :].float()
    row_weights = attn.float() * rows[:, None, :, None].to(torch.float32)
    column_totals = row_weights.sum(dim=-2)  # c_j = Σ_{i∈R} A[i, j]
    first = first_valid_index(valid)  # (B,)
    idx = first[:, None, None, None].expand(attn.shape[0], attn.shape[1], attn.shape[2], 1)
    to_first = attn.float().gather(-1, idx).squeeze(-1)  # (B, H, S): A[i, f]
    n_rows = rows.sum(dim=-1).to(torch.float32)[:, None]
    return {
        "emb_top_column_mass": top_column_mass(emb, h4),
        "rows_top_column_mass": top_column_mass(column_totals, h4),
        "emb_entropy": normalized_entropy(emb, v4),
        "row_consistency": row_consistency(attn, rows[:, None, :], v4),
        "emb_first_token_mass": first_token_mass(emb, v4),
        "rows_first_token_mass": (to_first * rows[:, None, :].to(torch.float32)).sum(dim=-1) / n_rows,
    }


def uniform_causal_attention(valid: Tensor) -> Tensor:
    """(B, 1, S, S): row i uniform over the valid keys j <= i (the reference for every metric)."""
    valid = valid.bool()
    s = valid.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    allowed = (causal[None] & valid[:, None, :]).to(torch.float32)
    return (allowed / allowed.sum(dim=-1, keepdim=True).clamp(min=1.0)).unsqueeze(1)


def mean_pairwise_cosine(h: Tensor | np.ndarray) -> float:
    """Mean cos(h_u, h_v) over pairs u != v of the rows of `h` (normalised here); NaN for fewer than 2 rows."""
    x = torch.as_tensor(np.asarray(h) if not isinstance(h, Tensor) else h).to(torch.float64)
    if x.dim() != 2 or x.shape[0] < 2:
        return math.nan
    x = torch.nn.functional.normalize(x, dim=1)
    n = x.shape[0]
    return float((x.sum(dim=0).square().sum() - (x * x).sum()) / (n * (n - 1)))


def participation_ratio(x: Tensor | np.ndarray) -> float:
    """(Σλ)² / Σλ² of the covariance eigenvalues of the rows of `x` (U, D); NaN for U < 2 or zero variance."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(torch.float64)
    if x.dim() != 2 or x.shape[0] < 2:
        return math.nan
    centred = x - x.mean(dim=0, keepdim=True)
    cov = centred.T @ centred / (x.shape[0] - 1)
    eig = torch.linalg.eigvalsh(cov).clamp(min=0.0)
    total = float(eig.sum())
    if total <= 0:
        return math.nan
    return total**2 / float((eig**2).sum())


def category_sets(catalog: Any) -> tuple[np.ndarray, list[str], str] | None:
    """Multi-hot (N, G) bool category matrix, the category names and the field used; None if no field.

    `genres` (MovieLens) is split on whitespace; `category` (synthetic, Taobao) is one label.
    """
    frame = catalog.items
    if "genres" in frame.columns:
        name, split = "genres", True
    elif "category" in frame.columns:
        name, split = "category", False
    else:
        return None
    values = frame[name].fillna("").astype(str).to_numpy()
    labels = [v.split() if split else ([v.strip()] if v.strip() else []) for v in values]
    vocab = sorted({c for row in labels for c in row})
    index = {c: i for i, c in enumerate(vocab)}
    multi_hot = np.zeros((len(values), max(1, len(vocab))), dtype=bool)
    for i, row in enumerate(labels):
        multi_hot[i, [index[c] for c in row]] = True
    return multi_hot, vocab, name


def jaccard_to_target(candidates: Tensor, targets: Tensor, multi_hot: Tensor) -> Tensor:
    """Jaccard of each candidate's category set with its row's target set.

    candidates (U, K) item indices (-1 = no item), targets (U,), multi_hot (N, G) bool ->
    (U, K) float, NaN for the -1 slots and 0 where both sets are empty.
    """
    present = candidates >= 0
    cand = multi_hot[candidates.clamp(min=0)].to(torch.float32)  # (U, K, G)
    tgt = multi_hot[targets].to(torch.float32)[:, None, :]  # (U, 1, G)
    inter = (cand * tgt).sum(-1)
    union = cand.sum(-1) + tgt.sum(-1) - inter
    jac = torch.where(union > 0, inter / union.clamp(min=1.0), torch.zeros_like(inter))
    return torch.where(present, jac, torch.full_like(jac, math.nan))


def category_jaccard_at_k(candidates: Tensor, targets: Tensor, multi_hot: Tensor) -> Tensor:
    """Per user: mean over the (present) top-K items of the item-vs-target category Jaccard; (U,).

    NaN for users whose target has no category or who have no candidate.
    """
    jac = jaccard_to_target(candidates, targets, multi_hot)
    per_user = torch.nanmean(jac, dim=1)
    has_category = multi_hot[targets].any(dim=-1)
    return torch.where(has_category, per_user, torch.full_like(per_user, math.nan))


def random_item_jaccard(targets: Tensor, multi_hot: Tensor) -> Tensor:
    """Expected category Jaccard between each target and a uniformly random catalog item; (U,)."""
    unique, counts = torch.unique(multi_hot, dim=0, return_counts=True)  # distinct category sets
    u = unique.to(torch.float32)
    tgt = multi_hot[targets].to(torch.float32)
    inter = tgt @ u.T  # (U, n_sets)
    union = tgt.sum(-1, keepdim=True) + u.sum(-1)[None] - inter
    jac = torch.where(union > 0, inter / union.clamp(min=1.0), torch.zeros_like(inter))
    expected = (jac * counts.to(torch.float32)[None]).sum(-1) / counts.sum()
    return torch.where(tgt.any(-1), expected, torch.full_like(expected, math.nan))


# ---- running a model -------------------------------------------------------------------------


@contextmanager
def eager_attention(decoder: torch.nn.Module):
    """Switch a HF decoder to eager attention (so it returns attention weights), restore it after."""
    config = decoder.config
    original = getattr(config, "_attn_implementation", None)
    setter = getattr(decoder, "set_attn_implementation", None)
    try:
        if setter is not None:
            setter("eager")
        else:
            config._attn_implementation = "eager"
        if config._attn_implementation != "eager":
            raise KarmaError(f"could not switch {type(decoder).__name__} to eager attention")
        yield
    finally:
        if original is not None:
            if setter is not None:
                setter(original)
            else:
                config._attn_implementation = original


@dataclass
class AttentionPass:
    """One eager pass of the query tower: `h_t`, per-layer attention, masks and segment layout."""

    h: Tensor  # (B, D) unit h_t, identical to the served query tower's output
    attentions: tuple[Tensor, ...]  # per layer (B, H, S, S)
    valid: Tensor  # (B, S) bool
    history: Tensor  # (B, S) bool: history-item positions that are valid
    hist_len: int  # L: the history block is positions [0, L), then the query, then [EMB]


@torch.inference_mode()
def attention_pass(setup: Setup, positions: np.ndarray) -> AttentionPass:
    """Run the query tower with eager attention on split `positions`, keeping every attention map.

    Same sequence, mask and position ids as `QueryTower.forward` (tests check `h` matches it).
    """
    setup.model.eval()
    qt = setup.model.query_tower
    inputs = to_device(setup.batcher.encoder_inputs(positions), setup.device)
    embeds, mask = qt.build_sequence(**inputs)
    position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # as QueryTower.run_decoder
    with eager_attention(qt.decoder):
        out = qt.decoder(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=False,
            output_attentions=True,
        )
    if not out.attentions:
        raise KarmaError(f"{type(qt.decoder).__name__} returned no attention weights with output_attentions=True")
    hist_len = inputs["hist_mask"].shape[1]
    history = torch.zeros_like(mask, dtype=torch.bool)
    history[:, :hist_len] = inputs["hist_mask"].bool()
    return AttentionPass(
        h=qt.head(out.last_hidden_state[:, -1]),
        attentions=tuple(a.float() for a in out.attentions),
        valid=mask.bool(),
        history=history,
        hist_len=hist_len,
    )


@dataclass
class AttentionMap:
    """Head-averaged attention of one user for every layer, restricted to valid positions."""

    user: int
    position: int  # split position of the user's test target
    n_query: int  # valid query tokens
    n_history: int  # valid history items; [EMB] is the last position
    layers: list[np.ndarray]  # per layer (n, n), n = n_query + n_history + 1
    history_first: bool = True  # block order: history, query, [EMB] (False: maps of the older query-first tower)


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
            out[f"{name} · mean over layers"] = _nanmean(values)
            out[f"{name} · last layer"] = _nanmean(values[-1])
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
            out[f"{name} · mean over layers"] = _nanmean(values)
            out[f"{name} · last layer"] = _nanmean(values[-1:])
        out.update(self.references)
        return out


def _nanmean(x: np.ndarray | Tensor) -> float:
    arr = np.asarray(x, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return float(finite.mean()) if finite.size else math.nan


class _Mean:
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


def _attention_map(p: AttentionPass, row: int, user: int, position: int) -> AttentionMap:
    keep = p.valid[row].nonzero().squeeze(-1)
    n_query = int(p.valid[row, p.hist_len : -1].sum())
    n_history = int(p.history[row].sum())
    layers = [a[row].mean(0)[keep][:, keep].cpu().numpy() for a in p.attentions]
    return AttentionMap(user=user, position=position, n_query=n_query, n_history=n_history, layers=layers)


@torch.inference_mode()
def top_k_items(users: Tensor, items: Tensor, targets: EvalTargets, k: int, batch_size: int = 256) -> Tensor:
    """(U, k) best items by inner product after the protocol's exclusions; -1 where fewer than k remain."""
    out = []
    k = min(k, items.shape[0])
    for start in range(0, len(users), batch_size):
        scores = users[start : start + batch_size] @ items.T
        if targets.exclude_offsets is not None and targets.exclude_items is not None:
            for r in range(scores.shape[0]):
                u = start + r
                lo, hi = targets.exclude_offsets[u], targets.exclude_offsets[u + 1]
                excluded = torch.from_numpy(targets.exclude_items[lo:hi])
                excluded = excluded[excluded != int(targets.items[u])]  # the target is never excluded
                scores[r, excluded] = -math.inf
        values, index = scores.topk(k, dim=1)
        out.append(torch.where(torch.isfinite(values), index, torch.full_like(index, -1)))
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def shared_h_hit_rates(h: Tensor, items: Tensor, targets: EvalTargets, k: int) -> tuple[float, float]:
    """(HR@k of each user's own h_t, HR@k when every user is given the users' mean direction instead).

    Same users, targets and exclusions; equal numbers mean the ranking owes nothing to the user.
    """
    from training.evaluation.metrics import rank_targets

    if len(h) == 0:
        return math.nan, math.nan
    shared = torch.nn.functional.normalize(h.float().mean(dim=0, keepdim=True), dim=-1).expand_as(h)
    rates = []
    for users in (h.float(), shared):
        ranks = rank_targets(users, items.float(), targets.items, targets.exclude_offsets, targets.exclude_items)
        rates.append(float((ranks < k).float().mean()))
    return rates[0], rates[1]


@torch.inference_mode()
def recon_fidelity(setup: Setup, h: Tensor, target_items: np.ndarray, batch_size: int = 64) -> tuple[float, float]:
    """(token accuracy, cross-entropy) of decoding each target's text from `proj(h_t)`, token-weighted."""
    model = setup.model
    model.eval()
    correct = loss_sum = 0.0
    tokens = 0
    for start in range(0, len(target_items), batch_size):
        text = to_device(setup.batcher.texts_of(target_items[start : start + batch_size]), setup.device)
        hb = h[start : start + batch_size].to(setup.device)
        dtype = model.query_tower.decoder.get_input_embeddings().weight.dtype
        prefix = model.heads.recon_prefix(hb).unsqueeze(1).to(dtype)
        loss, acc = model.decode_text_loss(prefix, text)
        n = int((text.labels != IGNORE_INDEX).sum())
        correct += acc * n
        loss_sum += float(loss) * n
        tokens += n
    if tokens == 0:
        return math.nan, math.nan
    return correct / tokens, loss_sum / tokens


def model_name(setup: Setup, checkpoint: Path) -> str:
    run = setup.config.train.run_name or checkpoint.parent.name
    return f"{run} ({setup.config.loss.preset})"


def diagnose_setup(
    setup: Setup,
    checkpoint: Path,
    n_users: int = 256,
    batch_size: int = 32,
    map_users: int = 2,
    map_positions: np.ndarray | None = None,
) -> ModelDiagnostics:
    """Every diagnostic of the module docstring for one model, on the first `n_users` test users.

    `map_positions` (split positions) picks the users drawn in the attention maps; by default the
    `map_users` evaluated users with the longest histories.
    """
    cfg = setup.config
    targets = eval_targets(setup.split, "test", cfg.eval.exclude_history, n_users)
    if targets.n_users == 0:
        raise KarmaError(f"{checkpoint}: the test split has no users")
    hist_len = targets.history_end - targets.history_start
    if map_positions is None:
        order = np.argsort(-hist_len, kind="stable")[:map_users]
        map_positions = targets.positions[np.sort(order)]
    map_set = {int(p): i for i, p in enumerate(map_positions)}
    maps: list[AttentionMap | None] = [None] * len(map_positions)

    metric_means = {name: _Mean() for name in ATTENTION_METRICS}
    reference_means = {name: _Mean() for name in ATTENTION_METRICS}
    hs = []
    for start in range(0, targets.n_users, batch_size):
        positions = targets.positions[start : start + batch_size]
        p = attention_pass(setup, positions)
        hs.append(p.h.float().cpu())
        per_layer = [attention_metrics(a, p.valid, p.history) for a in p.attentions]
        for name in ATTENTION_METRICS:
            metric_means[name].add(torch.stack([m[name] for m in per_layer], dim=1).cpu())  # (B, L, H)
        uniform = attention_metrics(uniform_causal_attention(p.valid), p.valid, p.history)
        for name in ATTENTION_METRICS:
            reference_means[name].add(uniform[name][:, 0].cpu())  # (B,)
        for row, pos in enumerate(positions):
            if int(pos) in map_set:
                maps[map_set[int(pos)]] = _attention_map(p, row, int(targets.users[start + row]), int(pos))
    extra = [pos for pos, i in map_set.items() if maps[i] is None]  # map users outside the evaluated ones
    if extra:
        p = attention_pass(setup, np.asarray(extra, dtype=np.int64))
        for row, pos in enumerate(extra):
            maps[map_set[pos]] = _attention_map(p, row, int(setup.split.seq_users[pos]), pos)

    h = torch.cat(hs)
    n_layers = len(p.attentions)
    per_layer = {name: np.asarray(metric_means[name].value()).reshape(n_layers, -1) for name in ATTENTION_METRICS}
    reference = {name: np.full(n_layers, float(reference_means[name].value())) for name in ATTENTION_METRICS}

    dim = h.shape[1]
    pr = participation_ratio(h)
    scalars: dict[str, float] = {
        "effective_rank": pr,
        "effective_rank_ratio": pr / dim,
        "h_mean_cosine": mean_pairwise_cosine(h),
    }
    references: dict[str, float] = {
        "effective_rank": float(min(dim, max(1, targets.n_users - 1))),
        "effective_rank_ratio": float(min(dim, max(1, targets.n_users - 1))) / dim,
        "h_mean_cosine": 0.0,
    }
    items = embed_items(setup)
    own_hr, shared_hr = shared_h_hit_rates(h, items, targets, PERSONAL_K)
    scalars[f"hr@{PERSONAL_K}_own_h"], scalars[f"hr@{PERSONAL_K}_shared_h"] = own_hr, shared_hr
    references[f"hr@{PERSONAL_K}_own_h"] = references[f"hr@{PERSONAL_K}_shared_h"] = math.nan
    notes: list[str] = []
    recon_trained = setup.model.weights.recon > 0
    acc, loss = recon_fidelity(setup, h, targets.items)
    scalars["recon_token_accuracy"], scalars["recon_loss"] = acc, loss
    references["recon_token_accuracy"] = references["recon_loss"] = math.nan
    if not recon_trained:
        notes.append(f"L_recon: {UNTRAINED_RECON}")

    jac_key = f"category_jaccard@{JACCARD_K}"
    categories = category_sets(setup.dataset.catalog)
    if categories is None:
        scalars[jac_key] = references[jac_key] = math.nan
        notes.append(f"{jac_key}: n/a (the catalog has no genres/category field)")
        category_field = None
    else:
        multi_hot = torch.from_numpy(categories[0])
        category_field = categories[2]
        top = top_k_items(h, items, targets, JACCARD_K)
        target_t = torch.from_numpy(targets.items)
        scalars[jac_key] = _nanmean(category_jaccard_at_k(top, target_t, multi_hot))
        references[jac_key] = _nanmean(random_item_jaccard(target_t, multi_hot))

    protocol = {
        "dataset": setup.dataset.name,
        "split": "test (leave-one-out, last event per user)",
        "users": int(targets.n_users),
        "max_history": int(cfg.data.max_history),
        "history_length": {
            "mean": float(hist_len.mean()),
            "min": int(hist_len.min()),
            "max": int(hist_len.max()),
        },
        "n_items": int(setup.dataset.catalog.n_items),
        "exclude_history": bool(cfg.eval.exclude_history),
        "category_field": category_field,
        "split_fingerprint": setup.split.fingerprint(),
        "layers": n_layers,
        "heads": int(per_layer[ATTENTION_METRICS[0]].shape[1]),
        "embed_dim": int(dim),
    }
    return ModelDiagnostics(
        name=model_name(setup, checkpoint),
        checkpoint=str(checkpoint),
        preset=cfg.loss.preset,
        recon_trained=recon_trained,
        protocol=protocol,
        per_layer=per_layer,
        reference_per_layer=reference,
        scalars=scalars,
        references=references,
        notes=notes,
        maps=[m for m in maps if m is not None],
    )


# ---- reports ---------------------------------------------------------------------------------


def protocol_line(results: Sequence[ModelDiagnostics]) -> str:
    p = results[0].protocol
    hist = p["history_length"]
    parts = [
        f"dataset={p['dataset']}",
        f"split={p['split']}",
        f"users={p['users']}",
        f"history length={hist['mean']:.1f} mean ({hist['min']}-{hist['max']}), newest {p['max_history']} kept",
        f"top-{JACCARD_K} over all {p['n_items']} items"
        + (", history excluded (target kept)" if p["exclude_history"] else ""),
        f"categories={p['category_field'] or 'n/a'}",
        "attention: mean over users; reference = uniform causal attention / random items",
    ]
    if len({r.protocol["split_fingerprint"] for r in results}) > 1:
        parts.append("WARNING: the models were trained on different data (different users)")
    return ", ".join(parts)


def _fmt(value: float, name: str) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}" if name == "effective_rank" else f"{value:.4f}"


def _row_label(key: str) -> tuple[str, str]:
    base, _, suffix = key.partition(" · ")
    label = METRIC_LABELS.get(base, base)
    return (f"{label} · {suffix}" if suffix else label), base


def print_table(results: Sequence[ModelDiagnostics], console: Any = None) -> None:
    """Rich table: rows = metrics, columns = models + reference; protocol and notes below."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(width=max(120, 48 + 26 * (len(results) + 1)))
    table = Table(title="Collapse diagnostics")
    table.add_column("metric", style="bold", no_wrap=True)
    for r in results:
        table.add_column(escape(r.name), justify="right", no_wrap=True)
    table.add_column("reference", justify="right", style="dim", no_wrap=True)
    summaries = [r.summary() for r in results]
    reference = results[0].reference_summary()
    for key in summaries[0]:
        label, base = _row_label(key)
        cells = []
        for r, s in zip(results, summaries, strict=True):
            cell = _fmt(s[key], base)
            if base.startswith("recon_") and not r.recon_trained:
                cell += " (untrained head)"
            cells.append(cell)
        table.add_row(escape(label), *cells, _fmt(reference.get(key, math.nan), base))
    console.print(table)
    console.print(f"[dim]protocol:[/dim] {escape(protocol_line(results))}", soft_wrap=True, highlight=False)
    for r in results:
        for note in r.notes:
            console.print(f"[dim]note ({escape(r.name)}):[/dim] {escape(note)}", soft_wrap=True, highlight=False)


def report_dict(results: Sequence[ModelDiagnostics], figures: Mapping[str, Any]) -> dict[str, Any]:
    models = {}
    for r in results:
        models[r.name] = {
            "checkpoint": r.checkpoint,
            "preset": r.preset,
            "recon_trained": r.recon_trained,
            "notes": r.notes,
            "protocol": r.protocol,
            "summary": r.summary(),
            "reference": r.reference_summary(),
            "per_layer": {name: r.per_layer[name] for name in ATTENTION_METRICS},  # [layer][head]
            "map_users": [m.user for m in r.maps],
        }
    definitions = (__doc__ or "").split("Notation", 1)[-1]
    return {
        "protocol": protocol_line(results),
        "definitions": "Notation" + definitions,
        "models": models,
        "figures": dict(figures),
    }


def run_diagnostics(
    checkpoints: Sequence[Path],
    n_users: int = 256,
    out_dir: Path | None = None,
    batch_size: int = 32,
    map_users: int = 2,
    print_results: bool = True,
) -> dict[str, Any]:
    """Diagnose one or two checkpoints; print the table, write diagnostics.json and the PNGs.

    Default output folder: `<run>/diagnostics` of the first checkpoint, or
    `<run>/diagnostics_vs_<other run>` with a second one. Returns the JSON payload (+ "out_dir").
    """
    from training.attention_maps import plot_attention_by_layer, plot_attention_maps
    from training.checkpoint import read_checkpoint_info
    from training.setup import build_setup

    if not 1 <= len(checkpoints) <= 2:
        raise KarmaError("diagnose takes one checkpoint, or two to compare")
    if n_users < 2:
        raise KarmaError(f"--users must be at least 2 (effective rank needs a covariance), got {n_users}")
    from training.checkpoint import resolve_checkpoint

    paths = [resolve_checkpoint(Path(c)) for c in checkpoints]
    results: list[ModelDiagnostics] = []
    map_positions: np.ndarray | None = None
    fingerprint = None
    for path in paths:
        info = read_checkpoint_info(path)
        setup = build_setup(info.config, checkpoint=path, progress=False)
        same_data = fingerprint is not None and setup.split.fingerprint() == fingerprint
        result = diagnose_setup(
            setup,
            path,
            n_users,
            batch_size=batch_size,
            map_users=map_users,
            map_positions=map_positions if same_data else None,
        )
        if results and result.name == results[0].name:
            result.name = f"{result.name} #2"
        results.append(result)
        if fingerprint is None:
            fingerprint = setup.split.fingerprint()
            map_positions = np.asarray([m.position for m in result.maps], dtype=np.int64)
        del setup
    if out_dir is None:
        run = paths[0].parent
        out_dir = run / ("diagnostics" if len(paths) == 1 else f"diagnostics_vs_{paths[1].parent.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        LAYER_PLOT: plot_attention_by_layer(results, out_dir / LAYER_PLOT),
        MAPS_PLOT: plot_attention_maps(results, out_dir / MAPS_PLOT),
    }
    payload = report_dict(results, figures)
    (out_dir / JSON_FILE).write_text(json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")
    if print_results:
        print_table(results)
        from rich.console import Console

        Console().print(
            f"[dim]wrote[/dim] {out_dir / JSON_FILE}, {LAYER_PLOT}, {MAPS_PLOT}", highlight=False, soft_wrap=True
        )
    log.info("diagnostics written to %s", out_dir)
    return {**payload, "out_dir": str(out_dir)}
