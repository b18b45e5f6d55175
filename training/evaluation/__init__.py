"""Full-ranking evaluation under the project's leave-one-out protocol (DESIGN.md §3).

`eval_targets` picks the examples (one per user) and the exclusion lists, `rank_targets` ranks each
target among all catalog items by inner product, `metrics_from_ranks` turns ranks into HR / NDCG /
MRR, and `evaluate_embeddings` does all of it with a warm/cold split. Print `protocol_text(...)`
beside every number.
"""

from training.evaluation.metrics import metric_names, metrics_from_ranks, rank_from_scores, rank_targets
from training.evaluation.protocol import EvalTargets, eval_targets, full_history_csr, protocol_for, protocol_text
from training.evaluation.report import (
    evaluate_embeddings,
    print_metrics_table,
    save_metrics_json,
    segment_metrics,
)

__all__ = [
    "EvalTargets",
    "eval_targets",
    "evaluate_embeddings",
    "full_history_csr",
    "metric_names",
    "metrics_from_ranks",
    "print_metrics_table",
    "protocol_for",
    "protocol_text",
    "rank_from_scores",
    "rank_targets",
    "save_metrics_json",
    "segment_metrics",
]
