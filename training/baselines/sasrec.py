"""SASRec (Kang & McAuley, ICDM 2018), ID-only, as a reference point for the LLM towers.

Architecture: item-ID embedding + learned absolute positional embedding, `layers` pre-LN causal
self-attention blocks (`torch.nn.TransformerEncoderLayer(norm_first=True)`), a final LayerNorm.
The hidden state at the last position is the user embedding; items are scored by the inner
product with the *same* item-embedding table (shared input/output embeddings, as in SASRec), so
the project's common ranking code evaluates it like any two-tower model.

Sequences are left-padded (index 0 = padding, item i is token i + 1), so the newest event always
sits at position `max_len - 1` in training and at inference.

Training data: each user's sequence up to but excluding the validation target (and the test
target); every position is a next-item target given the prefix before it. Sequences longer than
`max_len + 1` are cut into non-overlapping windows from the end, so every training target is
used exactly once per epoch (the original paper only keeps the newest `max_len`; RecBole feeds
every prefix as its own example, which costs ~`max_len`x more compute for the same targets).

Losses:
* "ce" (default): full softmax cross-entropy over all items at every position, the stronger
  modern variant (e.g. Klenitskiy & Vasilev, RecSys 2023, "SASRec+"),
* "bce": the original binary cross-entropy with one uniformly sampled negative per position.

Validation: after every `eval_every` epochs, full-ranking NDCG@10 on the validation targets
(history excluded, the protocol of `training.evaluation`); the best epoch's weights are kept.
Test-time user history = all events before the test target (which includes the validation
target), truncated to the newest `max_len`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from karma.progress import progress_bar
from training.baselines_config import SASRecConfig
from training.data.schema import Dataset
from training.data.split import Split
from training.evaluation.protocol import EvalTargets, eval_targets
from training.evaluation.report import evaluate_embeddings

log = logging.getLogger(__name__)


class SASRec(nn.Module):
    """Causal transformer over item-ID sequences; `forward` returns (B, L, hidden) states."""

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.n_items = n_items
        self.cfg = cfg
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            d_model=cfg.hidden,
            nhead=cfg.heads,
            dim_feedforward=cfg.ffn_hidden,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(cfg.hidden)
        self.register_buffer(
            "causal_mask", nn.Transformer.generate_square_subsequent_mask(cfg.max_len), persistent=False
        )
        self.apply(self._init)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq: (B, L) left-padded tokens (0 = pad, item i -> i + 1), L <= max_len."""
        length = seq.shape[1]
        pad = (seq > 0).unsqueeze(-1)
        pos = torch.arange(self.cfg.max_len - length, self.cfg.max_len, device=seq.device)
        x = self.dropout(self.item_emb(seq) + self.pos_emb(pos)) * pad
        x = self.encoder(x, mask=self.causal_mask[:length, :length], is_causal=True)
        return self.final_norm(x)

    def item_table(self) -> torch.Tensor:
        """(N, hidden) output embeddings of the catalog (padding row dropped)."""
        return self.item_emb.weight[1:]


def _input_matrix(split: Split, positions: np.ndarray, max_len: int) -> np.ndarray:
    """(U, max_len) left-padded tokens of the events before each position (newest max_len)."""
    positions = np.asarray(positions, dtype=np.int64)
    starts = split.user_offsets[split.seq_users[positions]].astype(np.int64)
    idx = positions[:, None] - max_len + np.arange(max_len, dtype=np.int64)[None, :]
    valid = idx >= starts[:, None]
    return np.where(valid, split.seq_items[np.clip(idx, 0, None)].astype(np.int64) + 1, 0)


def training_windows(
    split: Split, max_len: int, max_windows_per_user: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (W, max_len) int64.

    Inputs are left-padded tokens, targets the 0-based next item at each position (-100 where
    there is no input). Built from each user's events before the validation/test targets, cut
    into non-overlapping windows of `max_len` targets from the newest backwards.
    """
    n_users = len(split.user_offsets) - 1
    held = np.bincount(split.seq_users[split.valid_pos], minlength=n_users) + np.bincount(
        split.seq_users[split.test_pos], minlength=n_users
    )
    starts = split.user_offsets[:-1].astype(np.int64)
    ends = split.user_offsets[1:].astype(np.int64) - held
    n_targets = np.maximum(ends - starts - 1, 0)
    n_windows = -(-n_targets // max_len)  # ceil
    if max_windows_per_user is not None:
        n_windows = np.minimum(n_windows, max_windows_per_user)
    users = np.repeat(np.arange(n_users), n_windows)
    offsets = np.concatenate([[0], np.cumsum(n_windows)[:-1]])
    k = np.arange(len(users)) - np.repeat(offsets, n_windows)  # window number, 0 = newest
    win_end = ends[users] - k * max_len  # exclusive end of the window's targets
    idx = win_end[:, None] - (max_len + 1) + np.arange(max_len + 1, dtype=np.int64)[None, :]
    valid = idx >= starts[users][:, None]
    tokens = np.where(valid, split.seq_items[np.clip(idx, 0, None)].astype(np.int64) + 1, 0)
    inputs = tokens[:, :-1]
    targets = np.where(valid[:, :-1], tokens[:, 1:] - 1, -100)
    return inputs, targets


def _loss(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    hidden = model(inputs)
    keep = targets >= 0
    h = hidden[keep]  # (M, D)
    tgt = targets[keep]
    table = model.item_table()
    if model.cfg.loss == "ce":
        return F.cross_entropy(h @ table.T, tgt)
    neg = torch.randint(0, model.n_items, tgt.shape, generator=gen).to(tgt.device)
    pos_logit = (h * table[tgt]).sum(-1)
    neg_logit = (h * table[neg]).sum(-1)
    return F.softplus(-pos_logit).mean() + F.softplus(neg_logit).mean()


@torch.no_grad()
def sasrec_user_embeddings(
    model: SASRec, dataset: Dataset | None, split: Split, positions: np.ndarray, batch_size: int | None = None
) -> torch.Tensor:
    """(U, hidden) float32 CPU: the last hidden state given the newest `max_len` events before each position."""
    del dataset  # the split carries everything; kept in the signature for symmetry with other towers
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = _input_matrix(split, positions, model.cfg.max_len)
    batch_size = batch_size or model.cfg.eval_batch_size
    out = []
    for b0 in range(0, len(tokens), batch_size):
        seq = torch.from_numpy(tokens[b0 : b0 + batch_size]).to(device)
        out.append(model(seq)[:, -1].float().cpu())
    model.train(was_training)
    if not out:
        return torch.zeros(0, model.cfg.hidden)
    return torch.cat(out)


@torch.no_grad()
def sasrec_item_embeddings(model: SASRec) -> torch.Tensor:
    """(N, hidden) float32 CPU item embeddings (row i = catalog item i)."""
    return model.item_table().detach().float().cpu().clone()


def _validate(model: SASRec, split: Split, targets: EvalTargets) -> dict[str, float]:

    users = sasrec_user_embeddings(model, None, split, targets.positions)
    return evaluate_embeddings(users, sasrec_item_embeddings(model), targets, None, ks=(10, 200))["all"]


def train_sasrec(
    dataset: Dataset,
    split: Split,
    cfg: SASRecConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SASRec:
    """Train on the split's training sequences, keep the best epoch by validation NDCG@10.

    The returned model (in eval mode) carries `train_log`: one dict per epoch (loss, seconds and,
    when validated, HR@10 / NDCG@10 / HR@200 on the validation targets) and `best_epoch`.
    """
    cfg = cfg or SASRecConfig()
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(dataset, split, cfg, torch.device(device), progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train(dataset: Dataset, split: Split, cfg: SASRecConfig, device: torch.device, progress: bool) -> SASRec:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = SASRec(dataset.catalog.n_items, cfg).to(device)
    inputs_np, targets_np = training_windows(split, cfg.max_len, cfg.max_windows_per_user)
    if len(inputs_np) == 0:
        raise ValueError(f"data set {dataset.name}: no training sequences with at least two events")
    inputs, targets = torch.from_numpy(inputs_np), torch.from_numpy(targets_np)
    n_targets = int((targets >= 0).sum())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    valid = eval_targets(split, "valid", exclude_history=True) if cfg.eval_every and len(split.valid_pos) else None

    steps_per_epoch = math.ceil(len(inputs) / cfg.batch_size)
    log.info(
        "SASRec on %s: %d items, %d windows, %d training targets, %d steps/epoch, config %s",
        dataset.name,
        dataset.catalog.n_items,
        len(inputs),
        n_targets,
        steps_per_epoch,
        asdict(cfg),
    )
    best_score, best_state, best_epoch, stale = -1.0, None, 0, 0
    train_log: list[dict[str, float]] = []
    bar = progress_bar(total=cfg.epochs * steps_per_epoch, desc=f"SASRec {dataset.name}", disable=not progress)
    train_cpu = 0.0  # process CPU seconds spent in training steps (validation excluded), cumulative
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        model.train()
        order = torch.randperm(len(inputs), generator=gen)
        total, seen = 0.0, 0
        for b0 in range(0, len(order), cfg.batch_size):
            batch = order[b0 : b0 + cfg.batch_size]
            x, y = inputs[batch].to(device), targets[batch].to(device)
            loss = _loss(model, x, y, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n = int((y >= 0).sum())
            total += loss.item() * n
            seen += n
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{total / max(seen, 1):.4f}")
        train_cpu += time.process_time() - cpu0
        entry: dict[str, float] = {"epoch": epoch, "loss": total / max(seen, 1), "train_cpu_seconds": train_cpu}
        if valid is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            metrics = _validate(model, split, valid)
            entry.update({f"valid_{k}": metrics[k] for k in ("HR@10", "NDCG@10", "HR@200")})
            if metrics["NDCG@10"] > best_score:
                best_score, best_epoch, stale = metrics["NDCG@10"], epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        entry["seconds"] = time.perf_counter() - t0
        train_log.append(entry)
        log.info(
            "SASRec epoch %d/%d loss %.4f%s (%.1fs)",
            epoch,
            cfg.epochs,
            entry["loss"],
            f" valid HR@10 {entry['valid_HR@10']:.4f} NDCG@10 {entry['valid_NDCG@10']:.4f}"
            if "valid_NDCG@10" in entry
            else "",
            entry["seconds"],
        )
        if cfg.max_cpu_seconds is not None and train_cpu >= cfg.max_cpu_seconds:
            log.info("SASRec: training CPU budget %.0f s used after epoch %d, stopping", cfg.max_cpu_seconds, epoch)
            break
        if cfg.patience and stale >= cfg.patience:
            log.info("SASRec: no validation improvement for %d evaluations, stopping", stale)
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(train_log)
    model.eval()
    model.train_log = train_log  # type: ignore[attr-defined]
    model.best_epoch = best_epoch  # type: ignore[attr-defined]
    log.info("SASRec: kept epoch %d (valid NDCG@10 %.4f)", best_epoch, best_score)
    return model
