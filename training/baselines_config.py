"""The baselines' names and SASRec's hyper-parameters, torch-free: `karma baselines` builds its flags
from them (one --flag per SASRecConfig field) without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BASELINES = ("popular", "sasrec", "content")  # karma baselines --which


@dataclass
class SASRecConfig:
    """SASRec hyper-parameters; defaults follow the paper's ML-1M setting (hidden 64, 2 blocks, 50)."""

    hidden: int = 64  # embedding and transformer width
    layers: int = 2  # self-attention blocks
    heads: int = 2  # attention heads (the paper used 1; RecBole uses 2)
    ffn_hidden: int = 256  # feed-forward inner width (RecBole's default for hidden 64)
    dropout: float = 0.2  # on embeddings, attention and feed-forward
    max_len: int = 50  # newest events the model reads
    epochs: int = 30  # passes over the training targets
    batch_size: int = 128  # windows (sequences of max_len targets) per step
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    loss: Literal["ce", "bce"] = "ce"  # full-softmax CE (default) or the original 1-negative BCE
    seed: int = 0  # model init, shuffling, dropout and negative sampling
    eval_every: int = 1  # validate every N epochs and keep the best weights (0 = never, keep the last)
    patience: int = 0  # stop after N validations without improvement (0 = run all epochs)
    eval_batch_size: int = 512  # users per batch when computing user embeddings
    threads: int | None = None  # torch intra-op threads while training (None = leave torch's setting);
    # 1 avoids the large slow-down of oversubscribed OpenMP threads when other jobs share the CPU
    max_windows_per_user: int | None = None  # newest N windows of max_len targets per user (None = all;
    # 1 = the original paper's "newest max_len events only", a cheaper, weaker setting)
    max_cpu_seconds: float | None = None  # stop after the epoch in which training (validation not counted)
    # has used this much process CPU time; for comparisons at equal training compute (None = no budget)
