"""The action loss `L_act`: rank the clicked next item above negatives.

Three interchangeable forms (DESIGN §1, §9):

* `catalog_softmax_loss` (the default while the catalog fits): an exact softmax over every item.
* `sampled_softmax_loss` (large catalogs): InfoNCE / sampled softmax over the batch's own positives
  (in-batch negatives) plus optional extra sampled negatives, with logQ popularity correction and
  accidental-hit masking.
* `pairwise_logistic_loss` (the paper's form): `-log σ(h·e⁺ − h·e⁻)` averaged over valid
  (user, negative) pairs; `in_batch_negatives` builds the in-batch negative set for it, and
  exposed-but-unclicked items can be concatenated to it by the caller.

All functions are pure (no state, no parameters) and differentiable in every embedding argument.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "catalog_softmax_loss",
    "in_batch_negatives",
    "pairwise_logistic_from_scores",
    "pairwise_logistic_loss",
    "sampled_softmax_loss",
]


def _zero_with_grad(*tensors: Tensor) -> Tensor:
    """A scalar 0 that is still attached to the graph of `tensors` (so `.backward()` works)."""
    out = tensors[0].sum() * 0.0
    for t in tensors[1:]:
        out = out + t.sum() * 0.0
    return out


def sampled_softmax_loss(
    h: Tensor,
    pos_emb: Tensor,
    pos_idx: Tensor,
    neg_emb: Tensor | None = None,
    neg_idx: Tensor | None = None,
    log_q: Tensor | None = None,
    temperature: float = 0.05,
) -> Tensor:
    """Sampled-softmax (InfoNCE) retrieval loss with in-batch + sampled negatives and logQ correction.

    For every row `i` (a user/query state), the candidates are the positives of *all* rows of the
    batch (in-batch negatives) followed by `M` extra sampled negatives shared by the whole batch::

        C      = [pos_emb; neg_emb]                     # (B + M, D)
        ids    = [pos_idx; neg_idx]                     # (B + M,)
        logits = h @ C.T / temperature                  # (B, B + M)
        logits -= log_q[ids]                            # logQ correction (if log_q is given)
        logits[i, j] = -inf  if ids[j] == pos_idx[i] and j != i   # accidental hits
        loss   = mean_i  cross_entropy(logits[i], target=i)

    What it optimises: the log-likelihood of the clicked item under a softmax over the catalog,
    estimated with the batch's candidates. In-batch negatives are drawn (roughly) in proportion to
    item popularity, which biases the estimate towards pushing popular items down; subtracting
    `log q(item)` from each logit (Yi et al., RecSys 2019, "Sampling-bias-corrected neural
    modeling") makes the sampled softmax a consistent estimate of the full softmax. The correction
    is applied to every column, the diagonal (the row's positive) included, as is standard; it is
    applied *after* dividing by the temperature (as in TF-Recommenders).

    Accidental hits: when the row's positive item also appears in another column (the same item
    clicked by two rows of the batch, or drawn again as a sampled negative), that column is masked
    out for this row, so the model is never asked to rank an item below itself.

    Args:
        h: (B, D) user/query vectors `h_t` (expected unit-norm; not re-normalised here).
        pos_emb: (B, D) item embeddings of each row's clicked (positive) item.
        pos_idx: (B,) int64 catalog ids of those items.
        neg_emb: (M, D) extra sampled negatives shared by the batch, or None (in-batch only).
        neg_idx: (M,) int64 catalog ids of `neg_emb`; required whenever `neg_emb` is given.
        log_q: (N_items,) float log sampling probability of every catalog item (e.g. log of the
            item's share of training clicks, which is how in-batch positives are drawn), or None
            for no correction. Must be finite for every item that appears in the batch.
        temperature: the softmax temperature τ. With unit vectors the raw scores lie in [-1, 1];
            a small τ (0.02–0.1) sharpens the softmax enough to separate items. Smaller τ weighs
            hard negatives more; the logQ term is not scaled by it.

    Returns:
        Scalar mean cross-entropy over the B rows.
    """
    if h.dim() != 2 or pos_emb.shape != h.shape:
        raise ValueError(f"h and pos_emb must both be (B, D); got {tuple(h.shape)} and {tuple(pos_emb.shape)}")
    if pos_idx.shape != (h.shape[0],):
        raise ValueError(f"pos_idx must be (B,) = ({h.shape[0]},); got {tuple(pos_idx.shape)}")
    if (neg_emb is None) != (neg_idx is None):
        raise ValueError("neg_emb and neg_idx must be given together (ids are needed for masking and logQ)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    cand = pos_emb
    cand_idx = pos_idx
    if neg_emb is not None and neg_idx is not None:
        if neg_emb.dim() != 2 or neg_emb.shape[1] != h.shape[1]:
            raise ValueError(f"neg_emb must be (M, {h.shape[1]}); got {tuple(neg_emb.shape)}")
        if neg_idx.shape != (neg_emb.shape[0],):
            raise ValueError(f"neg_idx must be (M,) = ({neg_emb.shape[0]},); got {tuple(neg_idx.shape)}")
        cand = torch.cat([pos_emb, neg_emb], dim=0)
        cand_idx = torch.cat([pos_idx, neg_idx], dim=0)

    logits = (h @ cand.T).float() / temperature  # (B, B + M); float32 even under bf16 autocast
    if log_q is not None:
        logits = logits - log_q.to(device=logits.device, dtype=logits.dtype)[cand_idx].unsqueeze(0)

    b = h.shape[0]
    hit = pos_idx.unsqueeze(1) == cand_idx.unsqueeze(0)  # (B, B + M)
    own = torch.zeros_like(hit)
    own[:, :b] = torch.eye(b, dtype=torch.bool, device=hit.device)
    hit = hit & ~own  # never mask a row's own positive
    logits = logits.masked_fill(hit, float("-inf"))

    target = torch.arange(b, device=h.device)
    return F.cross_entropy(logits, target)


def pairwise_logistic_loss(
    h: Tensor,
    pos_emb: Tensor,
    neg_emb: Tensor,
    neg_mask: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """The paper's pairwise logistic (BPR-style) action loss `-log σ(h·e⁺ − h·e⁻)`.

    For each row `i` with positive score `s⁺ᵢ = h_i·e⁺ᵢ` and each of its valid negatives `k` with
    score `s⁻ᵢₖ = h_i·e⁻ᵢₖ`::

        loss = mean over valid (i, k) of softplus(-(s⁺ᵢ - s⁻ᵢₖ) / temperature)

    (`softplus(-x) = -log σ(x)`, computed stably). It asks only that each positive beat each of
    its negatives by a margin, unlike the softmax loss, which ranks the positive against all
    candidates jointly; negatives are per row, so exposed-but-unclicked items (hard negatives
    from the same impression) fit naturally next to in-batch negatives (`in_batch_negatives`).

    The average is taken over all valid pairs of the batch, so a row with more valid negatives
    weighs more. Rows whose negatives are all padding contribute nothing; if the batch has no
    valid pair at all the result is a 0 that is still attached to the graph.

    Args:
        h: (B, D) user/query vectors.
        pos_emb: (B, D) embeddings of each row's clicked item.
        neg_emb: (B, K, D) each row's negatives (padded to K).
        neg_mask: (B, K) bool, True = a real negative, False = padding; None = all valid.
        temperature: divides the score difference. 1.0 is the paper's form; with unit vectors the
            scores lie in [-1, 1], so a smaller value (e.g. 0.1) gives the logistic a useful slope.

    Returns:
        Scalar mean loss over valid (row, negative) pairs.
    """
    if h.dim() != 2 or pos_emb.shape != h.shape:
        raise ValueError(f"h and pos_emb must both be (B, D); got {tuple(h.shape)} and {tuple(pos_emb.shape)}")
    if neg_emb.dim() != 3 or neg_emb.shape[0] != h.shape[0] or neg_emb.shape[2] != h.shape[1]:
        raise ValueError(f"neg_emb must be (B, K, D) = ({h.shape[0]}, K, {h.shape[1]}); got {tuple(neg_emb.shape)}")
    if neg_mask is not None and neg_mask.shape != neg_emb.shape[:2]:
        raise ValueError(f"neg_mask must be (B, K) = {tuple(neg_emb.shape[:2])}; got {tuple(neg_mask.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    s_pos = (h * pos_emb).sum(dim=-1).float()  # (B,)
    s_neg = torch.einsum("bd,bkd->bk", h, neg_emb).float()  # (B, K)
    if neg_mask is None and s_neg.numel() == 0:
        return _zero_with_grad(h, pos_emb, neg_emb)
    return pairwise_logistic_from_scores(s_pos, s_neg, neg_mask, temperature, _zero_with_grad(h, pos_emb, neg_emb))


def pairwise_logistic_from_scores(
    s_pos: Tensor, s_neg: Tensor, neg_mask: Tensor | None, temperature: float, zero: Tensor
) -> Tensor:
    """`pairwise_logistic_loss` on precomputed scores: s_pos (B,), s_neg (B, K), mask (B, K) or None.

    For negatives shared by many rows (in-batch positives) a caller computes `h @ E.T` once instead
    of materialising (B, K, D) negatives. `zero` is returned when no pair is valid.
    """
    pair = F.softplus(-(s_pos.unsqueeze(1) - s_neg) / temperature)  # (B, K)
    if neg_mask is None:
        return pair.mean() if pair.numel() else zero
    mask = neg_mask.to(device=pair.device, dtype=torch.bool)
    n_valid = int(mask.sum())
    if n_valid == 0:
        return zero
    return pair.masked_fill(~mask, 0.0).sum() / n_valid


def catalog_softmax_loss(
    h: Tensor, catalog_emb: Tensor, target_cols: Tensor, pos_emb: Tensor | None = None, scale: Tensor | float = 20.0
) -> Tensor:
    """Exact softmax over the whole catalog: `-log softmax(scale · h @ E.T)[target]`.

    What it optimises: the log-likelihood of the clicked item among *every* item, the quantity full
    ranking evaluates, with no sampling bias to correct (no logQ) and no accidental hits (each item is
    one column). With a 3,883-item catalog and 1,600 targets a step this is ~0.8 GFLOP, cheaper than
    one decoder layer; it beat 16 in-batch + 128 sampled negatives by 2-7 HR@200 points on ML-1M.

    `pos_emb` (M, D), when given, replaces each row's target column by `scale · h·pos_emb`: each
    row's positive with its own training-time ID dropout, independent of the draw the catalog
    forward made for that item as a negative. Without it the target column of `catalog_emb` is the
    positive (the cached path of `KarmaModel.forward` writes fresh rows into a no-grad cache).

    Args:
        h: (M, D) unit user states (one per supervised position).
        catalog_emb: (P, D) unit item embeddings of the candidate pool (the catalog minus cold items).
        target_cols: (M,) int64 column of each row's clicked item in `catalog_emb`.
        pos_emb: optional (M, D) fresh embeddings of the clicked items.
        scale: the logit scale 1/τ (a float, or a learned scalar tensor).
    """
    if h.dim() != 2 or catalog_emb.dim() != 2 or h.shape[1] != catalog_emb.shape[1]:
        raise ValueError(
            f"h (M, D) and catalog_emb (P, D) must share D; got {tuple(h.shape)}, {tuple(catalog_emb.shape)}"
        )
    if target_cols.shape != (h.shape[0],):
        raise ValueError(f"target_cols must be ({h.shape[0]},); got {tuple(target_cols.shape)}")
    logits = (h @ catalog_emb.T).float() * scale
    if pos_emb is not None:
        pos = ((h * pos_emb).sum(dim=-1, keepdim=True)).float() * scale
        logits = logits.scatter(1, target_cols.unsqueeze(1), pos)
    return F.cross_entropy(logits, target_cols)


def in_batch_negatives(pos_emb: Tensor, pos_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Every other row's positive as a negative, for `pairwise_logistic_loss`.

    Row `i` gets the positives of rows `j != i` in order (B − 1 of them). Where another row clicked
    the same item as row `i` (an accidental hit), the mask is False, so that pair is ignored.

    Args:
        pos_emb: (B, D) embeddings of each row's clicked item.
        pos_idx: (B,) int64 catalog ids of those items.

    Returns:
        `(neg_emb, neg_mask)`: (B, B − 1, D) negatives (differentiable: gathered from `pos_emb`)
        and a (B, B − 1) bool mask, True = a valid negative.
    """
    if pos_emb.dim() != 2 or pos_idx.shape != (pos_emb.shape[0],):
        raise ValueError(f"pos_emb must be (B, D) and pos_idx (B,); got {tuple(pos_emb.shape)}, {tuple(pos_idx.shape)}")
    b = pos_emb.shape[0]
    if b == 0:
        return pos_emb.new_zeros((0, 0, pos_emb.shape[1])), torch.zeros((0, 0), dtype=torch.bool, device=pos_idx.device)
    rows = torch.arange(b, device=pos_emb.device).unsqueeze(1)  # (B, 1)
    offs = torch.arange(b - 1, device=pos_emb.device).unsqueeze(0)  # (1, B-1)
    cols = offs + (offs >= rows).long()  # (B, B-1): 0..B-1 without the row itself
    neg_emb = pos_emb[cols]
    neg_mask = pos_idx[cols.to(pos_idx.device)] != pos_idx.unsqueeze(1)
    return neg_emb, neg_mask
