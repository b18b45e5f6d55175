"""Language-model cross-entropy for the text-decoding terms `L_gen`, `L_recon` and the semantic warm-up.

Alignment convention — read this before calling `lm_loss`:

* `lm_loss(logits, labels)` does **no shifting**: `logits[:, t]` is scored against `labels[:, t]`.
  The caller has already aligned them, i.e. `labels[:, t]` is the token that should follow the
  input prefix ending at position `t` (the next token), and every position that should not be
  scored (prompt, history tokens, the soft prefix, padding) holds `IGNORE_INDEX` (-100).
* Callers whose labels are aligned to the *inputs* (the Hugging Face convention: `labels` is a
  copy of `input_ids` with non-target positions set to -100) first call
  `shift_for_next_token(logits, labels)`, which drops the last logit and the first label, and
  then pass the result to `lm_loss`.

The loss is the mean over valid (non-ignored) tokens of the whole batch, so long targets weigh
more than short ones, as in standard causal-LM training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "lm_loss", "shift_for_next_token", "token_accuracy"]

IGNORE_INDEX = -100
"""Label value for positions that are not scored (matches `torch.nn.CrossEntropyLoss` and HF)."""


def _check(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be (B, T, V) and labels (B, T); got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )


def shift_for_next_token(logits: Tensor, input_ids_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align input-aligned labels for next-token prediction.

    Given `logits` (B, T, V) from a causal LM over inputs of length T and `input_ids_labels` (B, T)
    aligned to those inputs (label at `t` = the input token at `t`, -100 where not scored),
    returns `(logits[:, :-1], input_ids_labels[:, 1:])`, both of length T − 1: the logit at `t`
    now faces the token at `t + 1`, which is what `lm_loss` expects.
    """
    _check(logits, input_ids_labels)
    return logits[:, :-1, :], input_ids_labels[:, 1:]


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Token-level cross-entropy with pre-aligned labels (no shift inside; see the module docstring).

    What it optimises: the log-likelihood of the target text (`L_gen`: the target item's text after
    the history; `L_recon`: the same text decoded from the one-token soft prefix `proj(h_t)`;
    warm-up: an item's own text from its continuous token).

    Args:
        logits: (B, T, V) scores; `logits[:, t]` predicts `labels[:, t]`. Computed in float32.
        labels: (B, T) int64 target token ids, `IGNORE_INDEX` (-100) = not scored.

    Returns:
        Scalar mean cross-entropy over valid tokens; a 0 still attached to the graph (so
        `.backward()` is a no-op, not an error) when no label is valid.
    """
    _check(logits, labels)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != IGNORE_INDEX
    n_valid = int(valid.sum())
    if n_valid == 0:
        return logits.sum() * 0.0
    flat_logits = logits.reshape(-1, logits.shape[-1])
    # Score only the valid rows: cheaper for long prompts and avoids float32 copies of ignored rows.
    return F.cross_entropy(flat_logits[valid].float(), flat_labels[valid])


@torch.no_grad()
def token_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of valid positions where `argmax(logits[:, t]) == labels[:, t]` (same alignment as
    `lm_loss`); 0.0 when no label is valid."""
    _check(logits, labels)
    valid = labels != IGNORE_INDEX
    n_valid = int(valid.sum())
    if n_valid == 0:
        return 0.0
    correct = (logits.argmax(dim=-1) == labels) & valid
    return float(correct.sum()) / n_valid
