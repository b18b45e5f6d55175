"""KARMA's training losses (pure functions and small train-only heads; torch only).

* `L_act` (action): `catalog_softmax_loss` (exact softmax over the whole catalog, the default where it
  fits), `sampled_softmax_loss` (in-batch + sampled negatives, logQ correction, accidental-hit
  masking), `pairwise_logistic_loss` + `in_batch_negatives` (the paper's form).
* `L_gen`, `L_recon`, semantic warm-up: `lm_loss` (pre-aligned labels), `shift_for_next_token`,
  `token_accuracy`.
* `L_img`: `FlowMatchingHead` (conditional rectified flow, default) and `MSEHead` (ablation),
  built by name with `make_content_head`.
"""

from training.losses.action import (
    catalog_softmax_loss,
    in_batch_negatives,
    pairwise_logistic_from_scores,
    pairwise_logistic_loss,
    sampled_softmax_loss,
)
from training.losses.flow import FlowMatchingHead, MSEHead, make_content_head, sinusoidal_time_embedding
from training.losses.lm import IGNORE_INDEX, lm_loss, shift_for_next_token, token_accuracy

__all__ = [
    "IGNORE_INDEX",
    "FlowMatchingHead",
    "MSEHead",
    "catalog_softmax_loss",
    "in_batch_negatives",
    "lm_loss",
    "make_content_head",
    "pairwise_logistic_from_scores",
    "pairwise_logistic_loss",
    "sampled_softmax_loss",
    "shift_for_next_token",
    "sinusoidal_time_embedding",
    "token_accuracy",
]
