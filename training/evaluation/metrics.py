"""Full-ranking metrics: the rank of each user's target among *all* catalog items.

Ranking is exact and exhaustive (no sampled negatives): a user's score for every catalog item is
the inner product `h_u · e_j`, and the target's rank is the number of competing items that score
at least as high as it.

Ties are broken **pessimistically**: an item that scores exactly the same as the target counts as
ranked above it. A model that gives many items the same score (a popularity count, a collapsed or
all-zero embedding) therefore cannot look good by accident of ordering; with the optimistic rule
("strictly higher"), an all-zero model would put every target at rank 0.

Exclusion removes a user's history items from the competition (they are neither counted above
nor below the target); the target itself is never excluded, even when the user clicked it before.

Scores are computed in batches of users, so memory is `batch_size × n_items`, never `U × N`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


def _as_tensor(x: ArrayLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(dtype) if dtype is not None and t.dtype != dtype else t


def _float(x: ArrayLike) -> torch.Tensor:
    t = _as_tensor(x)
    if not t.is_floating_point():
        return t.to(torch.float32)
    # Low-precision scores create artificial ties; rank in at least float32.
    return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)


def rank_targets(
    user_emb: ArrayLike,
    item_emb: ArrayLike,
    targets: ArrayLike,
    exclude_offsets: ArrayLike | None = None,
    exclude_items: ArrayLike | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """0-based rank of each user's target among all items, by inner product.

    Args:
        user_emb: (U, D) user / query embeddings.
        item_emb: (N, D) item embeddings (the whole catalog).
        targets: (U,) int item index of each user's target.
        exclude_offsets, exclude_items: CSR lists of items to leave out of user u's ranking,
            `exclude_items[exclude_offsets[u]:exclude_offsets[u + 1]]` (duplicates are fine). Both or
            neither. The target is never excluded.
        batch_size: users scored at once.

    Returns:
        (U,) int64 CPU tensor: rank = #{j != target, j not excluded : s_j >= s_target}, so 0 is a hit
        at the top and ties count against the target.
    """
    users = _float(user_emb)
    items = _float(item_emb)
    if users.dtype != items.dtype:
        users, items = users.to(torch.float64), items.to(torch.float64)
    if users.ndim != 2 or items.ndim != 2 or users.shape[1] != items.shape[1]:
        raise ValueError(f"need user_emb (U, D) and item_emb (N, D); got {tuple(users.shape)} and {tuple(items.shape)}")
    targets_t = _as_tensor(targets, torch.int64).reshape(-1)
    n_users, n_items = users.shape[0], items.shape[0]
    if targets_t.shape[0] != n_users:
        raise ValueError(f"{targets_t.shape[0]} targets for {n_users} users")
    if n_users and (int(targets_t.min()) < 0 or int(targets_t.max()) >= n_items):
        raise ValueError(f"target item index out of range [0, {n_items})")
    if not (torch.isfinite(users).all() and torch.isfinite(items).all()):
        raise ValueError("embeddings contain NaN or inf; refusing to rank (the ranks would be meaningless)")
    if (exclude_offsets is None) != (exclude_items is None):
        raise ValueError("pass both exclude_offsets and exclude_items, or neither")
    offsets = excl = None
    if exclude_offsets is not None and exclude_items is not None:
        offsets = _as_tensor(exclude_offsets, torch.int64).reshape(-1)
        excl = _as_tensor(exclude_items, torch.int64).reshape(-1)
        if offsets.shape[0] != n_users + 1:
            raise ValueError(f"exclude_offsets has {offsets.shape[0]} entries, need U + 1 = {n_users + 1}")
        if len(excl) and (int(excl.min()) < 0 or int(excl.max()) >= n_items):
            raise ValueError(f"excluded item index out of range [0, {n_items})")

    device = items.device
    ranks = torch.empty(n_users, dtype=torch.int64)
    for b0 in range(0, n_users, max(1, batch_size)):
        b1 = min(b0 + max(1, batch_size), n_users)
        u = users[b0:b1].to(device)
        tgt = targets_t[b0:b1].to(device)
        scores = u @ items.T  # (B, N)
        rows = torch.arange(b1 - b0, device=device)
        # The target's own score comes from the same matrix, so it ties with itself exactly.
        above = scores >= scores[rows, tgt].unsqueeze(1)
        if offsets is not None and excl is not None:
            lo, hi = int(offsets[b0]), int(offsets[b1])
            lengths = offsets[b0 + 1 : b1 + 1] - offsets[b0:b1]
            excl_rows = torch.repeat_interleave(torch.arange(b1 - b0), lengths).to(device)
            above[excl_rows, excl[lo:hi].to(device)] = False
        above[rows, tgt] = False  # the target is never its own competitor (nor excluded)
        ranks[b0:b1] = above.sum(dim=1).cpu()
    return ranks


def rank_from_scores(scores: ArrayLike, targets: ArrayLike, exclude: ArrayLike | None = None) -> torch.Tensor:
    """Same rank rule as `rank_targets`, from an explicit (U, N) score matrix.

    `exclude` is an optional (U, N) bool mask of items to leave out of each user's ranking; the
    target is never excluded. Useful for baselines that are not inner-product models.
    """
    s = _float(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be (U, N), got {tuple(s.shape)}")
    tgt = _as_tensor(targets, torch.int64).reshape(-1).to(s.device)
    if tgt.shape[0] != s.shape[0]:
        raise ValueError(f"{tgt.shape[0]} targets for {s.shape[0]} users")
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN; refusing to rank")
    rows = torch.arange(s.shape[0], device=s.device)
    above = s >= s[rows, tgt].unsqueeze(1)
    if exclude is not None:
        mask = _as_tensor(exclude, torch.bool).to(s.device)
        if mask.shape != s.shape:
            raise ValueError(f"exclude mask {tuple(mask.shape)} does not match scores {tuple(s.shape)}")
        above &= ~mask
    above[rows, tgt] = False
    return above.sum(dim=1).to(torch.int64).cpu()


def metric_names(ks: Sequence[int]) -> list[str]:
    """Column order used by tables and JSON: HR@K..., NDCG@K..., MRR."""
    ks = sorted(set(int(k) for k in ks))
    return [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + ["MRR"]


def metrics_from_ranks(ranks: ArrayLike, ks: Sequence[int]) -> dict[str, float]:
    """HR@K, NDCG@K and MRR from 0-based ranks (one target per user), plus `count`.

    With one target per user, HR@K equals Recall@K. NDCG@K = 1 / log2(rank + 2) when rank < K, else 0
    (the ideal DCG of a single relevant item is 1). MRR = mean 1 / (rank + 1) over the full ranking
    (no cut-off). With no users, every metric is NaN and `count` is 0.
    """
    r = _as_tensor(ranks, torch.int64).reshape(-1).to(torch.float64)
    out: dict[str, float] = {}
    n = r.numel()
    for k in sorted(set(int(k) for k in ks)):
        out[f"HR@{k}"] = float((r < k).double().mean()) if n else math.nan
    for k in sorted(set(int(k) for k in ks)):
        gain = torch.where(r < k, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))
        out[f"NDCG@{k}"] = float(gain.mean()) if n else math.nan
    out["MRR"] = float((1.0 / (r + 1.0)).mean()) if n else math.nan
    out["count"] = n
    return out
