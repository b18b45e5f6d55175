"""Shared fixtures: small configs that write only under pytest's tmp_path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from karma.config import KarmaConfig, load_config

REPO = Path(__file__).resolve().parents[1]
KARMA_BIN = str(Path(sys.executable).with_name("karma"))
REDIS_URL = os.environ.get("KARMA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_up() -> bool:
    """Whether the test Redis answers a ping (tests that need it are skipped otherwise)."""
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


needs_redis = pytest.mark.skipif(not redis_up(), reason=f"no Redis at {REDIS_URL}")


@pytest.fixture
def tmp_config(tmp_path: Path) -> KarmaConfig:
    """Defaults with artifacts under tmp_path and a tiny synthetic data set."""
    return load_config(
        overrides=[
            f"paths.artifacts={tmp_path / 'artifacts'}",
            "data.synthetic.n_items=1000",
            "data.synthetic.n_users=300",
            "data.synthetic.n_events=6000",
            "features.text_encoder=hashing",
        ],
        environ={},
    )


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread() -> None:
    """Tiny models on 2 shared cores run 10-60x faster single-threaded (measured); tests use 1."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def tiny_train_overrides(tmp_path: Path) -> list[str]:
    """A seconds-scale training run: tiny backbone, hashing features, 1k-item synthetic data."""
    return [
        f"paths.artifacts={tmp_path / 'artifacts'}",
        "data.synthetic.n_items=1000",
        "data.synthetic.n_users=300",
        "data.synthetic.n_events=6000",
        "data.max_history=20",
        "features.text_encoder=hashing",
        "model.tiny_hidden=32",
        "model.embed_dim=32",
        "model.item_tower_hidden=64",
        "loss.sampled_negatives=32",
        "loss.flow_hidden=64",
        "train.batch_size=16",
        "train.steps=6",
        "train.semantic_warmup_steps=2",
        "train.warmup_steps=2",
        "train.checkpoint_every=1000",
        "eval.max_users=100",
    ]


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model trained and exported once per session: (checkpoint folder, bundle folder). Read-only."""
    import torch

    from export.bundle_writer import export_checkpoint
    from training.trainer import CHECKPOINT_DIR, run_dir, train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-export")
    config = load_config(overrides=tiny_train_overrides(root), environ={})
    train(config, progress=False)
    checkpoint = run_dir(config) / CHECKPOINT_DIR
    export_checkpoint(checkpoint, root / "bundle")
    return checkpoint, root / "bundle"
