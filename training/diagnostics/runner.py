"""`karma diagnose`: run every diagnostic of one or more checkpoints on the same test users."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from karma.errors import KarmaError
from karma.jsonable import to_jsonable
from training.diagnostics.attention import AttentionMap, attention_map, attention_pass
from training.diagnostics.metrics import (
    ATTENTION_METRICS,
    JACCARD_K,
    JSON_FILE,
    LAYER_PLOT,
    MAPS_PLOT,
    PERSONAL_K,
    UNTRAINED_RECON,
    attention_metrics,
    category_jaccard_at_k,
    category_sets,
    mean_pairwise_cosine,
    participation_ratio,
    random_item_jaccard,
    uniform_causal_attention,
)
from training.diagnostics.report import print_table, report_dict
from training.diagnostics.result import ModelDiagnostics, NanMean, nanmean
from training.evaluation import eval_targets
from training.evaluation.protocol import EvalTargets
from training.losses import IGNORE_INDEX
from training.setup import Setup, embed_items, to_device

log = logging.getLogger("training.diagnostics")


@torch.inference_mode()
def top_k_items(users: Tensor, items: Tensor, targets: EvalTargets, k: int, batch_size: int = 256) -> Tensor:
    """(U, k) best items by inner product after the protocol's exclusions; -1 where fewer than k remain."""
    out = []
    k = min(k, items.shape[0])
    for start in range(0, len(users), batch_size):
        scores = users[start : start + batch_size] @ items.T
        if targets.exclude_offsets is not None and targets.exclude_items is not None:
            for r in range(scores.shape[0]):
                u = start + r
                lo, hi = targets.exclude_offsets[u], targets.exclude_offsets[u + 1]
                excluded = torch.from_numpy(targets.exclude_items[lo:hi])
                excluded = excluded[excluded != int(targets.items[u])]  # the target is never excluded
                scores[r, excluded] = -math.inf
        values, index = scores.topk(k, dim=1)
        out.append(torch.where(torch.isfinite(values), index, torch.full_like(index, -1)))
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def shared_h_hit_rates(h: Tensor, items: Tensor, targets: EvalTargets, k: int) -> tuple[float, float]:
    """(HR@k of each user's own h_t, HR@k when every user is given the users' mean direction instead).

    Same users, targets and exclusions; equal numbers mean the ranking owes nothing to the user.
    """
    from training.evaluation.metrics import rank_targets

    if len(h) == 0:
        return math.nan, math.nan
    shared = torch.nn.functional.normalize(h.float().mean(dim=0, keepdim=True), dim=-1).expand_as(h)
    rates = []
    for users in (h.float(), shared):
        ranks = rank_targets(users, items.float(), targets.items, targets.exclude_offsets, targets.exclude_items)
        rates.append(float((ranks < k).float().mean()))
    return rates[0], rates[1]


@torch.inference_mode()
def recon_fidelity(setup: Setup, h: Tensor, target_items: np.ndarray, batch_size: int = 64) -> tuple[float, float]:
    """(token accuracy, cross-entropy) of decoding each target's text from `proj(h_t)`, token-weighted."""
    model = setup.model
    model.eval()
    correct = loss_sum = 0.0
    tokens = 0
    for start in range(0, len(target_items), batch_size):
        text = to_device(setup.batcher.texts_of(target_items[start : start + batch_size]), setup.device)
        hb = h[start : start + batch_size].to(setup.device)
        dtype = model.query_tower.decoder.get_input_embeddings().weight.dtype
        prefix = model.heads.recon_prefix(hb).unsqueeze(1).to(dtype)
        loss, acc = model.decode_text_loss(prefix, text)
        n = int((text.labels != IGNORE_INDEX).sum())
        correct += acc * n
        loss_sum += float(loss) * n
        tokens += n
    if tokens == 0:
        return math.nan, math.nan
    return correct / tokens, loss_sum / tokens


def model_name(setup: Setup, checkpoint: Path) -> str:
    run = setup.config.train.run_name or checkpoint.parent.name
    return f"{run} ({setup.config.loss.preset})"


def diagnose_setup(
    setup: Setup,
    checkpoint: Path,
    n_users: int = 256,
    batch_size: int = 32,
    map_users: int = 2,
    map_positions: np.ndarray | None = None,
) -> ModelDiagnostics:
    """Every diagnostic of the module docstring for one model, on the first `n_users` test users.

    `map_positions` (split positions) picks the users drawn in the attention maps; by default the
    `map_users` evaluated users with the longest histories.
    """
    cfg = setup.config
    targets = eval_targets(setup.split, "test", cfg.eval.exclude_history, n_users)
    if targets.n_users == 0:
        raise KarmaError(f"{checkpoint}: the test split has no users")
    hist_len = targets.history_end - targets.history_start
    if map_positions is None:
        order = np.argsort(-hist_len, kind="stable")[:map_users]
        map_positions = targets.positions[np.sort(order)]
    map_set = {int(p): i for i, p in enumerate(map_positions)}
    maps: list[AttentionMap | None] = [None] * len(map_positions)

    metric_means = {name: NanMean() for name in ATTENTION_METRICS}
    reference_means = {name: NanMean() for name in ATTENTION_METRICS}
    hs = []
    for start in range(0, targets.n_users, batch_size):
        positions = targets.positions[start : start + batch_size]
        p = attention_pass(setup, positions)
        hs.append(p.h.float().cpu())
        per_layer = [attention_metrics(a, p.valid, p.history) for a in p.attentions]
        for name in ATTENTION_METRICS:
            metric_means[name].add(torch.stack([m[name] for m in per_layer], dim=1).cpu())  # (B, L, H)
        uniform = attention_metrics(uniform_causal_attention(p.valid), p.valid, p.history)
        for name in ATTENTION_METRICS:
            reference_means[name].add(uniform[name][:, 0].cpu())  # (B,)
        for row, pos in enumerate(positions):
            if int(pos) in map_set:
                maps[map_set[int(pos)]] = attention_map(p, row, int(targets.users[start + row]), int(pos))
    extra = [pos for pos, i in map_set.items() if maps[i] is None]  # map users outside the evaluated ones
    if extra:
        p = attention_pass(setup, np.asarray(extra, dtype=np.int64))
        for row, pos in enumerate(extra):
            maps[map_set[pos]] = attention_map(p, row, int(setup.split.seq_users[pos]), pos)

    h = torch.cat(hs)
    n_layers = len(p.attentions)
    per_layer = {name: np.asarray(metric_means[name].value()).reshape(n_layers, -1) for name in ATTENTION_METRICS}
    reference = {name: np.full(n_layers, float(reference_means[name].value())) for name in ATTENTION_METRICS}

    dim = h.shape[1]
    pr = participation_ratio(h)
    scalars: dict[str, float] = {
        "effective_rank": pr,
        "effective_rank_ratio": pr / dim,
        "h_mean_cosine": mean_pairwise_cosine(h),
    }
    references: dict[str, float] = {
        "effective_rank": float(min(dim, max(1, targets.n_users - 1))),
        "effective_rank_ratio": float(min(dim, max(1, targets.n_users - 1))) / dim,
        "h_mean_cosine": 0.0,
    }
    items = embed_items(setup)
    own_hr, shared_hr = shared_h_hit_rates(h, items, targets, PERSONAL_K)
    scalars[f"hr@{PERSONAL_K}_own_h"], scalars[f"hr@{PERSONAL_K}_shared_h"] = own_hr, shared_hr
    references[f"hr@{PERSONAL_K}_own_h"] = references[f"hr@{PERSONAL_K}_shared_h"] = math.nan
    notes: list[str] = []
    recon_trained = setup.model.weights.recon > 0
    acc, loss = recon_fidelity(setup, h, targets.items)
    scalars["recon_token_accuracy"], scalars["recon_loss"] = acc, loss
    references["recon_token_accuracy"] = references["recon_loss"] = math.nan
    if not recon_trained:
        notes.append(f"L_recon: {UNTRAINED_RECON}")

    jac_key = f"category_jaccard@{JACCARD_K}"
    categories = category_sets(setup.dataset.catalog)
    if categories is None:
        scalars[jac_key] = references[jac_key] = math.nan
        notes.append(f"{jac_key}: n/a (the catalog has no genres/category field)")
        category_field = None
    else:
        multi_hot = torch.from_numpy(categories[0])
        category_field = categories[2]
        top = top_k_items(h, items, targets, JACCARD_K)
        target_t = torch.from_numpy(targets.items)
        scalars[jac_key] = nanmean(category_jaccard_at_k(top, target_t, multi_hot))
        references[jac_key] = nanmean(random_item_jaccard(target_t, multi_hot))

    protocol = {
        "dataset": setup.dataset.name,
        "split": "test (leave-one-out, last event per user)",
        "users": int(targets.n_users),
        "max_history": int(cfg.data.max_history),
        "history_length": {
            "mean": float(hist_len.mean()),
            "min": int(hist_len.min()),
            "max": int(hist_len.max()),
        },
        "n_items": int(setup.dataset.catalog.n_items),
        "exclude_history": bool(cfg.eval.exclude_history),
        "category_field": category_field,
        "split_fingerprint": setup.split.fingerprint(),
        "layers": n_layers,
        "heads": int(per_layer[ATTENTION_METRICS[0]].shape[1]),
        "embed_dim": int(dim),
    }
    return ModelDiagnostics(
        name=model_name(setup, checkpoint),
        checkpoint=str(checkpoint),
        preset=cfg.loss.preset,
        recon_trained=recon_trained,
        protocol=protocol,
        per_layer=per_layer,
        reference_per_layer=reference,
        scalars=scalars,
        references=references,
        notes=notes,
        maps=[m for m in maps if m is not None],
    )


def run_diagnostics(
    checkpoints: Sequence[Path],
    n_users: int = 256,
    out_dir: Path | None = None,
    batch_size: int = 32,
    map_users: int = 2,
    print_results: bool = True,
) -> dict[str, Any]:
    """Diagnose one or two checkpoints; print the table, write diagnostics.json and the PNGs.

    Default output folder: `<run>/diagnostics` of the first checkpoint, or
    `<run>/diagnostics_vs_<other run>` with a second one. Returns the JSON payload (+ "out_dir").
    """
    from training.checkpoint import read_checkpoint_info
    from training.diagnostics.plots import plot_attention_by_layer, plot_attention_maps
    from training.setup import build_setup

    if not 1 <= len(checkpoints) <= 2:
        raise KarmaError("diagnose takes one checkpoint, or two to compare")
    if n_users < 2:
        raise KarmaError(f"--users must be at least 2 (effective rank needs a covariance), got {n_users}")
    from training.checkpoint import resolve_checkpoint

    paths = [resolve_checkpoint(Path(c)) for c in checkpoints]
    results: list[ModelDiagnostics] = []
    map_positions: np.ndarray | None = None
    fingerprint = None
    for path in paths:
        info = read_checkpoint_info(path)
        setup = build_setup(info.config, checkpoint=path, progress=False)
        same_data = fingerprint is not None and setup.split.fingerprint() == fingerprint
        result = diagnose_setup(
            setup,
            path,
            n_users,
            batch_size=batch_size,
            map_users=map_users,
            map_positions=map_positions if same_data else None,
        )
        if results and result.name == results[0].name:
            result.name = f"{result.name} #2"
        results.append(result)
        if fingerprint is None:
            fingerprint = setup.split.fingerprint()
            map_positions = np.asarray([m.position for m in result.maps], dtype=np.int64)
        del setup
    if out_dir is None:
        run = paths[0].parent
        out_dir = run / ("diagnostics" if len(paths) == 1 else f"diagnostics_vs_{paths[1].parent.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        LAYER_PLOT: plot_attention_by_layer(results, out_dir / LAYER_PLOT),
        MAPS_PLOT: plot_attention_maps(results, out_dir / MAPS_PLOT),
    }
    payload = report_dict(results, figures)
    (out_dir / JSON_FILE).write_text(json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")
    if print_results:
        print_table(results)
        from rich.console import Console

        Console().print(
            f"[dim]wrote[/dim] {out_dir / JSON_FILE}, {LAYER_PLOT}, {MAPS_PLOT}", highlight=False, soft_wrap=True
        )
    log.info("diagnostics written to %s", out_dir)
    return {**payload, "out_dir": str(out_dir)}
