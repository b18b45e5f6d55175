"""Shared fixtures: small configs that write only under pytest's tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from karma.config import KarmaConfig, load_config

REPO = Path(__file__).resolve().parents[1]
KARMA_BIN = str(Path(sys.executable).with_name("karma"))


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
