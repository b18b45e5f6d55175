"""Assemble data, features, backbone and model: shared by `karma train`, `evaluate` and export.

Everything that turns a config (or a checkpoint) into tensors ready to train or evaluate lives
here once, so a checkpoint is evaluated on exactly the data and features it was trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from karma.config import KarmaConfig
from karma.errors import KarmaError
from training.checkpoint import backbone_from_checkpoint, load_weights, read_checkpoint_info
from training.data.registry import load_dataset
from training.data.schema import Dataset
from training.data.split import Split, split_dataset
from training.features import ItemFeatures, build_item_features
from training.model.backbone import Backbone, load_backbone
from training.model.batches import Batcher, content_target_slice
from training.model.karma import KarmaModel

log = logging.getLogger(__name__)


@dataclass
class Setup:
    config: KarmaConfig
    dataset: Dataset
    split: Split
    features: ItemFeatures
    backbone: Backbone
    model: KarmaModel
    batcher: Batcher
    device: torch.device


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise KarmaError(f"train.device={spec} but no CUDA device is visible")
    return torch.device(spec)


def tokenizer_corpus(dataset: Dataset) -> list[str]:
    """Texts the tiny backbone's tokenizer is trained on: item texts and distinct queries."""
    texts = dataset.catalog.item_text()
    if dataset.interactions.query is not None:
        texts += sorted({q for q in dataset.interactions.query if q})
    return texts


def build_setup(
    config: KarmaConfig,
    checkpoint: Path | None = None,
    device: torch.device | None = None,
    progress: bool = True,
) -> Setup:
    """Load data and features, build (or restore) the backbone and the model."""
    torch.set_num_threads(config.train.threads)
    dataset = load_dataset(config, progress=progress)
    split = split_dataset(dataset, config.data.min_history, config.data.max_history)
    features = build_item_features(dataset.catalog, config, progress=progress)
    if checkpoint is not None:
        info = read_checkpoint_info(checkpoint)
        if info.layout != features.layout:
            raise KarmaError(
                f"{checkpoint}: trained on features {info.layout.to_dict()} but the data now gives "
                f"{features.layout.to_dict()}"
            )
        backbone = backbone_from_checkpoint(checkpoint)
    else:
        backbone = load_backbone(config, corpus=lambda: tokenizer_corpus(dataset))
    content = content_target_slice(features)
    batcher = Batcher(dataset, split, features, backbone.tokenizer, config)
    torch.manual_seed(config.seed)  # towers and heads start from the same weights on every rank
    layout = features.layout
    model = KarmaModel(
        backbone,
        layout.dim,
        content.stop - content.start,
        config,
        id_buckets=layout.id_buckets,
        exact_ids=layout.id_scheme == "exact",
    )
    if config.loss.lm_vocab == "catalog":
        model.restrict_lm_vocab(catalog_token_ids(batcher, backbone), backbone.lm_head.weight.shape[0])
    if checkpoint is not None:
        load_weights(model, checkpoint)
    device = device or pick_device(config.train.device)
    model.to(device)
    return Setup(config, dataset, split, features, backbone, model, batcher, device)


def catalog_token_ids(batcher: Batcher, backbone: Backbone) -> torch.Tensor:
    """Every token id of every (truncated) item text, plus EOS: what the text targets can contain."""
    ids = {t for row in batcher.item_text_ids for t in row}
    ids.add(int(backbone.tokenizer.meta.eos_id))
    return torch.tensor(sorted(ids), dtype=torch.long)


def to_device(value: object, device: torch.device) -> object:
    """Move a (nested) batch to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if hasattr(value, "__dataclass_fields__"):
        return type(value)(**{k: to_device(getattr(value, k), device) for k in value.__dataclass_fields__})
    return value


@torch.inference_mode()
def embed_items(setup: Setup, batch_size: int = 4096) -> torch.Tensor:
    """Item-tower embeddings of the whole catalog, (N, D) on CPU."""
    setup.model.eval()
    n = setup.dataset.catalog.n_items
    out = []
    for start in range(0, n, batch_size):
        items = torch.arange(start, min(n, start + batch_size))
        inputs = to_device(setup.batcher.item_inputs(items), setup.device)
        out.append(setup.model.item_tower(**inputs).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def embed_users(setup: Setup, positions: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Query-tower `h_t` for the given split positions, (U, D) on CPU."""
    setup.model.eval()
    out = []
    for start in range(0, len(positions), batch_size):
        inputs = to_device(setup.batcher.encoder_inputs(positions[start : start + batch_size]), setup.device)
        out.append(setup.model.query_tower(**inputs).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, setup.config.model.embed_dim)
