"""PyTorch vs ONNX Runtime parity of the exported encoders, on real and random inputs.

The PyTorch side is the *training* model's towers as `build_setup` restores them from the
checkpoint (heads and all), so a pass here also shows that the head-free rebuild used for export
computes the same function. The ONNX side reads the graph files directly, so parity can run on a
bundle folder before its manifest exists (export does exactly that, and refuses to publish a
bundle that fails).

Query cases: every batch size x history length, once with real inputs (test users' queries and
newest histories, cut or left-padded to the length) and once with random ones (random query ids
and lengths, random padding, features drawn around the catalog's per-column mean/std). Item cases:
the whole catalog plus random feature rows (new items that no training run has seen).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from karma.bundle import ITEM_ENCODER_FILE, QUERY_ENCODER_FILE, open_session
from karma.contracts import (
    HIST_FEATURES_INPUT,
    HIST_MASK_INPUT,
    ITEM_BUCKETS_INPUT,
    QUERY_BUCKETS_INPUT,
    QUERY_IDS_INPUT,
    QUERY_MASK_INPUT,
)
from karma.errors import KarmaError
from training.setup import Setup

TOLERANCE = 1e-4


def _compare(reference: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    diff = float(np.abs(reference - actual).max()) if reference.size else 0.0
    num = (reference * actual).sum(-1)
    den = np.linalg.norm(reference, axis=-1) * np.linalg.norm(actual, axis=-1)
    cos = float((num / np.maximum(den, 1e-12)).min()) if reference.size else 1.0
    return diff, cos


def _fit_history(inputs: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Cut (keep the newest) or left-pad the history axis to exactly `length`."""
    out = dict(inputs)
    for name in (HIST_FEATURES_INPUT, HIST_MASK_INPUT, QUERY_BUCKETS_INPUT):
        if name not in inputs:
            continue
        value = inputs[name]
        have = value.shape[1]
        if have >= length:
            out[name] = value[:, have - length :].contiguous()
        else:
            pad = torch.zeros((value.shape[0], length - have, *value.shape[2:]), dtype=value.dtype)
            out[name] = torch.cat([pad, value], dim=1)
    mask = out[HIST_MASK_INPUT] = out[HIST_MASK_INPUT].clone()
    empty = mask.sum(1) == 0
    if empty.any():  # a cut can leave a row without history only if it had none; keep one real slot
        mask[empty, -1] = 1
    return out


def _random_query_inputs(
    rng: np.random.Generator, setup: Setup, batch: int, length: int, id_buckets: int
) -> dict[str, torch.Tensor]:
    matrix = setup.features.matrix
    q_len = int(rng.integers(1, setup.config.model.max_query_tokens + 1))
    vocab = setup.backbone.tokenizer.vocab_size
    query_ids = rng.integers(0, vocab, (batch, q_len))
    query_mask = np.zeros((batch, q_len), dtype=np.int64)
    hist_mask = np.zeros((batch, length), dtype=np.int64)
    for row in range(batch):
        query_mask[row, : int(rng.integers(0, q_len + 1))] = 1
        hist_mask[row, length - int(rng.integers(1, length + 1)) :] = 1
    mean, std = matrix.mean(0), matrix.std(0) + 1e-3
    features = (rng.standard_normal((batch, length, matrix.shape[1])) * std + mean).astype(np.float32)
    inputs = {
        QUERY_IDS_INPUT: torch.from_numpy(query_ids),
        QUERY_MASK_INPUT: torch.from_numpy(query_mask),
        HIST_FEATURES_INPUT: torch.from_numpy(features),
        HIST_MASK_INPUT: torch.from_numpy(hist_mask),
    }
    if id_buckets:
        inputs[QUERY_BUCKETS_INPUT] = torch.from_numpy(rng.integers(0, id_buckets, (batch, length)))
    return inputs


def _run(session: Any, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise KarmaError(f"the ONNX graph needs inputs {missing} that the PyTorch model does not take")
    try:
        return session.run(None, {n: inputs[n].numpy() for n in names})[0]
    except Exception as exc:
        shapes = {n: tuple(inputs[n].shape) for n in names}
        detail = str(exc).splitlines()[0]
        raise KarmaError(
            f"ONNX Runtime failed on inputs {shapes}: {detail} (a graph that runs only at batch 1 is the known "
            f"dynamo opset>=23 rotary problem; export with opset 18 or the torchscript exporter)"
        ) from None


def check_parity(
    bundle_dir: Path,
    setup: Setup | Path,
    batch_sizes: tuple[int, ...] = (1, 3, 8),
    history_lengths: tuple[int, ...] = (1, 7, 20),
    tolerance: float = TOLERANCE,
    seed: int = 0,
    min_cosine: float | None = None,
    random_query_min_cosine: float | None = None,
) -> dict[str, Any]:
    """Max abs diff and min cosine between PyTorch and ONNX Runtime.

    `passed` is max abs diff <= `tolerance` (fp32 graphs), or, when `min_cosine` is given (int8
    graphs, whose outputs differ by design), every output row's cosine with PyTorch >= `min_cosine`,
    except the random-*query* cases (uniformly random token ids: off-distribution noise that, under
    per-batch int8 activation scales, drags its whole batch), which must reach
    `random_query_min_cosine` (default: `min_cosine`) and are reported separately.
    `setup` is a `Setup` or a checkpoint folder (rebuilt with its own config on CPU).
    """
    if not isinstance(setup, Setup):
        from training.checkpoint import read_checkpoint_info
        from training.setup import build_setup

        checkpoint = Path(setup)
        setup = build_setup(
            read_checkpoint_info(checkpoint).config, checkpoint=checkpoint, device=torch.device("cpu"), progress=False
        )
    bundle_dir = Path(bundle_dir)
    model = setup.model.eval()
    q_session = open_session(bundle_dir / QUERY_ENCODER_FILE)
    i_session = open_session(bundle_dir / ITEM_ENCODER_FILE)
    q_buckets = QUERY_BUCKETS_INPUT in [i.name for i in q_session.get_inputs()]
    rng = np.random.default_rng(seed)

    positions = np.concatenate([setup.split.test_pos, setup.split.valid_pos])
    cases: list[dict[str, Any]] = []
    with torch.inference_mode():
        for batch in batch_sizes:
            for length in history_lengths:
                chosen = rng.choice(positions, size=batch, replace=len(positions) < batch)
                real = setup.batcher.encoder_inputs(np.sort(chosen))
                for kind, inputs in (
                    ("real", _fit_history(real, length)),
                    ("random", _random_query_inputs(rng, setup, batch, length, setup.features.layout.id_buckets)),
                ):
                    if not q_buckets:
                        inputs.pop(QUERY_BUCKETS_INPUT, None)
                    reference = model.query_tower(**inputs).float().cpu().numpy()
                    diff, cos = _compare(reference, _run(q_session, inputs))
                    cases.append(
                        {
                            "encoder": "query",
                            "inputs": kind,
                            "batch": batch,
                            "history": length,
                            "query_tokens": int(inputs[QUERY_IDS_INPUT].shape[1]),
                            "max_abs_diff": diff,
                            "min_cosine": cos,
                        }
                    )

        i_buckets = ITEM_BUCKETS_INPUT in [i.name for i in i_session.get_inputs()]
        n = setup.dataset.catalog.n_items
        matrix = setup.features.matrix
        item_sets: list[tuple[str, dict[str, torch.Tensor]]] = []
        for start in range(0, n, 4096):
            item_sets.append(("catalog", setup.batcher.item_inputs(torch.arange(start, min(n, start + 4096)))))
        for count in (*batch_sizes, 257):
            feats = (rng.standard_normal((count, matrix.shape[1])) * (matrix.std(0) + 1e-3) + matrix.mean(0)).astype(
                np.float32
            )
            inputs = {"features": torch.from_numpy(feats)}
            if setup.features.layout.id_buckets:
                inputs[ITEM_BUCKETS_INPUT] = torch.from_numpy(
                    rng.integers(0, setup.features.layout.id_buckets, (count,))
                )
            item_sets.append(("random", inputs))
        for kind, inputs in item_sets:
            if not i_buckets:
                inputs.pop(ITEM_BUCKETS_INPUT, None)
            reference = model.item_tower(**inputs).float().cpu().numpy()
            diff, cos = _compare(reference, _run(i_session, inputs))
            cases.append(
                {
                    "encoder": "item",
                    "inputs": kind,
                    "batch": int(inputs["features"].shape[0]),
                    "max_abs_diff": diff,
                    "min_cosine": cos,
                }
            )

    def summary(encoder: str) -> dict[str, float]:
        rows = [c for c in cases if c["encoder"] == encoder]
        out = {
            "max_abs_diff": max(c["max_abs_diff"] for c in rows),
            "min_cosine": min(c["min_cosine"] for c in rows),
            "cases": len(rows),
        }
        for kind in sorted({c["inputs"] for c in rows}):
            out[f"min_cosine_{kind}"] = min(c["min_cosine"] for c in rows if c["inputs"] == kind)
        return out

    query, item = summary("query"), summary("item")
    if min_cosine is None:
        criterion = {"metric": "max_abs_diff", "tolerance": tolerance}
        passed = max(query["max_abs_diff"], item["max_abs_diff"]) <= tolerance
    else:
        random_floor = min_cosine if random_query_min_cosine is None else random_query_min_cosine
        criterion = {"metric": "min_cosine", "min_cosine": min_cosine, "random_query_min_cosine": random_floor}
        passed = (
            min(query["min_cosine_real"], item["min_cosine"]) >= min_cosine
            and query["min_cosine_random"] >= random_floor
        )
    return {
        "tolerance": tolerance if min_cosine is None else None,
        "criterion": criterion,
        "passed": bool(passed),
        "batch_sizes": list(batch_sizes),
        "history_lengths": list(history_lengths),
        "query": query,
        "item": item,
        "cases": cases,
    }
