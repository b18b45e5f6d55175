"""Collapse diagnostics for trained KARMA models (`karma diagnose`; DESIGN §1, "semantic collapse").

metrics    the metric maths, pure functions on tensors (and every metric's definition)
attention  one eager pass of the query tower that keeps its attention maps
result     ModelDiagnostics: one model's numbers
runner     diagnose_setup / run_diagnostics: run them on test users of a checkpoint
report     the printed table, its protocol line and the JSON report
plots      attention_by_layer.png and attention_maps.png
"""

from training.diagnostics.attention import AttentionMap, AttentionPass, attention_pass, eager_attention
from training.diagnostics.metrics import (
    ATTENTION_METRICS,
    JACCARD_K,
    JSON_FILE,
    LAYER_PLOT,
    MAPS_PLOT,
    METRIC_LABELS,
    PERSONAL_K,
    UNTRAINED_RECON,
    attention_metrics,
    category_jaccard_at_k,
    category_sets,
    first_token_mass,
    first_valid_index,
    jaccard_to_target,
    mean_pairwise_cosine,
    normalized_entropy,
    participation_ratio,
    random_item_jaccard,
    row_consistency,
    top_column_mass,
    uniform_causal_attention,
)
from training.diagnostics.report import print_table, protocol_line, report_dict
from training.diagnostics.result import ModelDiagnostics
from training.diagnostics.runner import (
    diagnose_setup,
    model_name,
    recon_fidelity,
    run_diagnostics,
    shared_h_hit_rates,
    top_k_items,
)

__all__ = [
    "ATTENTION_METRICS",
    "JACCARD_K",
    "JSON_FILE",
    "LAYER_PLOT",
    "MAPS_PLOT",
    "METRIC_LABELS",
    "PERSONAL_K",
    "UNTRAINED_RECON",
    "AttentionMap",
    "AttentionPass",
    "ModelDiagnostics",
    "attention_metrics",
    "attention_pass",
    "category_jaccard_at_k",
    "category_sets",
    "diagnose_setup",
    "eager_attention",
    "first_token_mass",
    "first_valid_index",
    "jaccard_to_target",
    "mean_pairwise_cosine",
    "model_name",
    "normalized_entropy",
    "participation_ratio",
    "print_table",
    "protocol_line",
    "random_item_jaccard",
    "recon_fidelity",
    "report_dict",
    "row_consistency",
    "run_diagnostics",
    "shared_h_hit_rates",
    "top_column_mass",
    "top_k_items",
    "uniform_causal_attention",
]
