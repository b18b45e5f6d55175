"""Checkpoints: everything needed to resume training exactly, evaluate, or export.

    <run>/checkpoint/
        model.safetensors      all weights (towers + train-only heads); shared tensors stored once
        optimizer.pt           AdamW + LR scheduler state (resume only)
        trainer_state.json     step, preset, world size
        karma_config.yaml      the effective KarmaConfig of the run
        backbone_config.json   the HF config of the (possibly truncated) backbone
        tokenizer.json, tokenizer_meta.json
        feature_layout.json    the item feature layout the towers were trained on

A checkpoint is rebuilt without the original backbone files: the HF config gives the
architecture, the safetensors file the weights. Writes go to a temporary folder that is renamed
into place, so a crash mid-save never leaves a half checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from karma.config import KarmaConfig, config_to_yaml, load_config
from karma.contracts import FeatureLayout
from karma.errors import KarmaError
from karma.tokenization import TextTokenizer
from training.model.backbone import Backbone

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "karma_config.yaml"
BACKBONE_CONFIG_FILE = "backbone_config.json"
LAYOUT_FILE = "feature_layout.json"


@dataclass
class CheckpointInfo:
    directory: Path
    config: KarmaConfig
    state: dict[str, Any]
    layout: FeatureLayout


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    backbone: Backbone,
    config: KarmaConfig,
    layout: FeatureLayout,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> None:
    staging = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model(model, str(staging / MODEL_FILE))
    if optimizer is not None:
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None},
            staging / OPTIMIZER_FILE,
        )
    (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
    (staging / CONFIG_FILE).write_text(config_to_yaml(config))
    (staging / BACKBONE_CONFIG_FILE).write_text(backbone.causal_lm.config.to_json_string())
    (staging / LAYOUT_FILE).write_text(json.dumps(layout.to_dict(), indent=2))
    backbone.tokenizer.save(staging)
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint folder or a run folder that holds one (artifacts/runs/NAME or .../NAME/checkpoint)."""
    path = Path(path)
    if not (path / MODEL_FILE).is_file() and (path / "checkpoint" / MODEL_FILE).is_file():
        return path / "checkpoint"
    return path


def read_checkpoint_info(directory: Path) -> CheckpointInfo:
    if not (directory / MODEL_FILE).is_file():
        raise KarmaError(f"{directory}: not a KARMA checkpoint (no {MODEL_FILE})")
    return CheckpointInfo(
        directory=directory,
        config=load_config(directory / CONFIG_FILE, environ={}),
        state=json.loads((directory / STATE_FILE).read_text()),
        layout=FeatureLayout.from_dict(json.loads((directory / LAYOUT_FILE).read_text())),
    )


def backbone_from_checkpoint(directory: Path) -> Backbone:
    """Rebuild the backbone architecture (random weights) and tokenizer from a checkpoint folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((directory / BACKBONE_CONFIG_FILE).read_text())
    hf_config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    causal_lm = AutoModelForCausalLM.from_config(hf_config)
    return Backbone(causal_lm=causal_lm, tokenizer=TextTokenizer.load(directory), name=f"checkpoint:{directory}")


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    missing, unexpected = load_model(model, str(directory / MODEL_FILE), strict=False)
    if missing or unexpected:
        raise KarmaError(
            f"{directory}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def load_optimizer(directory: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    saved = torch.load(directory / OPTIMIZER_FILE, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None and saved.get("scheduler") is not None:
        scheduler.load_state_dict(saved["scheduler"])
