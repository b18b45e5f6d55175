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

import logging
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("training.diagnostics")

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
