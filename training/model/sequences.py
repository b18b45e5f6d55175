"""Every-position training: one causal pass over a window of a user's sequence, a target per position.

The served query tower reads `[c_1 … c_L][q][EMB]` (history, then the query, then [EMB]) and
returns `h_t` at [EMB]. Because the history comes first, the hidden state of `c_i` depends only on
`c_1 … c_i`, never on a query. So a training row can hold the history once and, after it, one
*slot* per supervised position j:

    [c_1 … c_n] [q_2 E_1] [q_3 E_2] … [q_{n+1} E_n]          (slot j: query of target j+1, then [EMB])

with a 4-D attention mask in which slot j's tokens see `c_1 … c_j` and, causally, their own slot
only, and position ids that continue from `c_j` (so slot j sits exactly where the served query
and [EMB] sit for the prefix `c_1 … c_j`). Then `hidden[E_j]` is, up to float rounding, the `h_t`
the service computes for that user after j clicks with that query: every position is trained on
the very quantity that is served, and `E_n` is the served request itself (`tests/test_parity`
checks this against the exported ONNX graph). A window of n history items costs
n + Σ_j (|q_j| + 1) tokens for n targets; the single-target layout costs n + |q| + 1 for one.

`L_gen` rides on the same pass: for the slots that carry regularizers, the target's text follows
[EMB] inside its slot (`E_j` predicts the first text token), so generation is conditioned on the
history and the query exactly as `h_t` is, and causality keeps `h_t` unaffected by it.

This module is pure numpy (the layout); `KarmaModel` turns it into tensors and runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from training.losses import IGNORE_INDEX

FAR = 1 << 30  # history index of a column that is not a valid history item (nothing sees it)


@dataclass
class PackedLayout:
    """Column layout of a batch of packed rows (B rows, T = Lh + Tb columns).

    Row b's first `Lh` columns are its history (left-aligned, `n_hist[b]` valid); the remaining
    `Tb` columns hold its slots back to back, then padding.
    """

    hist_items: np.ndarray  # (B, Lh) int64 item index (0 where padding)
    hist_valid: np.ndarray  # (B, Lh) bool
    block_ids: np.ndarray  # (B, Tb) int64 word ids (pad id at [EMB] and padding columns)
    block_is_emb: np.ndarray  # (B, Tb) bool: an [EMB] column
    allowed: np.ndarray  # (B, T, T) bool: query column may attend to key column
    position_ids: np.ndarray  # (B, T) int64
    gen_labels: np.ndarray  # (B, T) int64 next-token labels of L_gen (IGNORE_INDEX elsewhere)
    slot_row: np.ndarray  # (M,) int64 row of each supervised slot
    slot_col: np.ndarray  # (M,) int64 column of its [EMB] (within T)
    slot_hist: np.ndarray  # (M,) int64 history items it sees (j)
    slot_index: np.ndarray  # (M,) int64 index j - 1 into the row's targets (0-based)


def pack_rows(
    histories: Sequence[np.ndarray],
    slot_queries: Sequence[Sequence[list[int]]],
    slot_supervised: Sequence[np.ndarray],
    slot_texts: Sequence[dict[int, list[int]]],
    pad_id: int,
    eos_id: int,
) -> PackedLayout:
    """Lay out B rows. Row b has history `histories[b]` (n items) and n candidate slots.

    `slot_queries[b][j]` are the query ids of slot j (the query of target j+1, 0-based j: after
    history items 0..j); `slot_supervised[b]` (n,) bool picks the slots that are built;
    `slot_texts[b]` maps a built slot to the text ids that follow its [EMB] (L_gen), if any.
    """
    b_count = len(histories)
    lh = max(1, max(len(h) for h in histories))
    blocks: list[
        list[tuple[int, int, int, int]]
    ] = []  # per row: (word id, slot j, kind, offset); kind 0 q, 1 E, 2 text
    for b in range(b_count):
        row: list[tuple[int, int, int, int]] = []
        for j in np.flatnonzero(slot_supervised[b]):
            j = int(j)
            offset = 0
            for tok in slot_queries[b][j]:
                row.append((int(tok), j, 0, offset))
                offset += 1
            row.append((pad_id, j, 1, offset))
            offset += 1
            for tok in slot_texts[b].get(j, ()):
                row.append((int(tok), j, 2, offset))
                offset += 1
        blocks.append(row)
    tb = max(1, max(len(r) for r in blocks))
    t = lh + tb

    hist_items = np.zeros((b_count, lh), dtype=np.int64)
    hist_valid = np.zeros((b_count, lh), dtype=bool)
    block_ids = np.full((b_count, tb), pad_id, dtype=np.int64)
    block_is_emb = np.zeros((b_count, tb), dtype=bool)
    seg = np.full((b_count, t), -2, dtype=np.int64)  # -1 history, j slot j, -2 padding
    lim = np.full((b_count, t), -1, dtype=np.int64)  # newest history index a column may see
    hidx = np.full((b_count, t), FAR, dtype=np.int64)  # history index of a valid history column
    position_ids = np.zeros((b_count, t), dtype=np.int64)
    gen_labels = np.full((b_count, t), IGNORE_INDEX, dtype=np.int64)
    slot_row, slot_col, slot_hist = [], [], []

    cols = np.arange(lh)
    for b in range(b_count):
        n = len(histories[b])
        hist_items[b, :n] = histories[b]
        hist_valid[b, :n] = True
        seg[b, :lh] = -1
        lim[b, :lh] = cols
        hidx[b, :n] = cols[:n]
        position_ids[b, :lh] = cols
        row = blocks[b]
        for k, (tok, j, kind, offset) in enumerate(row):
            c = lh + k
            block_ids[b, k] = tok
            seg[b, c] = j
            lim[b, c] = j  # slot j sees history items 0..j
            position_ids[b, c] = j + 1 + offset
            if kind == 1:
                block_is_emb[b, k] = True
                slot_row.append(b)
                slot_col.append(c)
                slot_hist.append(j + 1)
        # L_gen labels: [EMB] predicts text_1, text_i predicts text_{i+1}, the last text token EOS.
        for k, (_, j, kind, _) in enumerate(row):
            if kind == 0:
                continue
            nxt = row[k + 1] if k + 1 < len(row) else None
            follows = nxt is not None and nxt[1] == j and nxt[2] == 2
            if kind == 1 and not follows and j not in slot_texts[b]:
                continue  # no text after this [EMB]: nothing to generate
            gen_labels[b, lh + k] = nxt[0] if follows else eos_id

    q = np.arange(t)
    allowed = hidx[:, None, :] <= lim[:, :, None]
    same_slot = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0) & (q[None, None, :] <= q[None, :, None])
    allowed |= same_slot
    allowed |= np.eye(t, dtype=bool)[None]  # every column sees itself (padding rows stay finite)
    slot_row_a = np.asarray(slot_row, dtype=np.int64)
    slot_hist_a = np.asarray(slot_hist, dtype=np.int64)
    return PackedLayout(
        hist_items=hist_items,
        hist_valid=hist_valid,
        block_ids=block_ids,
        block_is_emb=block_is_emb,
        allowed=allowed,
        position_ids=position_ids,
        gen_labels=gen_labels,
        slot_row=slot_row_a,
        slot_col=np.asarray(slot_col, dtype=np.int64),
        slot_hist=slot_hist_a,
        slot_index=slot_hist_a - 1,
    )


def pick_reg_slots(supervised: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Which supervised slots of one row also carry the regularizers: the last, plus random others up to `limit`."""
    chosen = np.zeros_like(supervised)
    idx = np.flatnonzero(supervised)
    if len(idx) == 0:
        return chosen
    chosen[idx[-1]] = True
    rest = idx[:-1]
    if limit > 1 and len(rest):
        chosen[rng.choice(rest, size=min(limit - 1, len(rest)), replace=False)] = True
    return chosen
