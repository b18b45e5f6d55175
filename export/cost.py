"""Serving cost of the exported towers, measured once at export time.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on the very modules that were
exported, at a documented reference request (batch 1, a full query, a full history), so
`/info` and the zero-added-cost report can quote one number per bundle without re-tracing ONNX.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from export.onnx_export import ServedTowers, example_item_inputs, example_query_inputs


def served_cost(towers: ServedTowers, features: Any, vocab_size: int, max_query_tokens: int, max_history: int) -> dict:
    """FLOPs of one request (batch 1, `max_query_tokens` query tokens, `max_history` history items)."""
    query_inputs = example_query_inputs(
        features, vocab_size, towers.id_buckets, batch=1, query_len=max_query_tokens, hist_len=max_history
    )
    query_inputs = {k: torch.ones_like(v) if k.endswith("mask") else v for k, v in query_inputs.items()}
    item_inputs = example_item_inputs(features, towers.id_buckets, n=1)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as query_counter:
            towers.query(**query_inputs)
        with FlopCounterMode(display=False) as item_counter:
            towers.item(**item_inputs)
    return {
        "reference_request": {"batch": 1, "query_tokens": max_query_tokens, "history_items": max_history},
        "query_flops": int(query_counter.get_total_flops()),
        "item_flops_per_item": int(item_counter.get_total_flops()),
        "counter": "torch.utils.flop_counter.FlopCounterMode (matmul/conv/attention FLOPs)",
    }
