"""Shared fixtures (small configs and bundles that write only under pytest's tmp_path) and the test tiers.

Plain helpers live in tests/helpers.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from karma.bundle import load_bundle
from karma.config import KarmaConfig, load_config, profile_overrides
from tests.helpers import REDIS_URL, redis_up, tiny_train_overrides


@pytest.fixture
def tmp_config(tmp_path: Path) -> KarmaConfig:
    """Defaults with artifacts under tmp_path and a tiny synthetic data set."""
    return load_config(
        overrides=[
            f"paths.artifacts={tmp_path / 'artifacts'}",
            *(o for o in profile_overrides() if o.startswith(("data.synthetic.", "features.text_encoder="))),
        ],
        environ={},
    )


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread() -> None:
    """Tiny models on 2 shared cores run 10-60x faster single-threaded (measured); tests use 1."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


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


# ---- test tiers ----------------------------------------------------------------------------------
# Every test file belongs to one tier (a test may carry its own tier marker instead). `./run test` runs
# them all; `./run test -m unit` is the seconds-scale loop, `-m "not e2e"` everything in-process.
UNIT, INTEGRATION, E2E = "unit", "integration", "e2e"
TIERS = {
    # unit: pure functions and small models in-process; no Redis, no ONNX Runtime session, no server
    **dict.fromkeys(
        [
            *("config", "evaluation", "intervals", "layout", "losses", "model"),
            *("movielens", "plots", "progress", "split", "synthetic"),
        ],
        UNIT,
    ),
    # integration: real Redis, ONNX Runtime, FAISS, the HTTP app, tiny trained models and bundles
    **dict.fromkeys(
        [
            "data_validation",
            "deploy",
            "diagnostics",
            "export",
            "export_variants",
            "features",
            "packaging",
            "reference_docs",
            "service",
            "service_batch_embed",
            "service_hardening",
            "service_hcache",
            "service_items",
            "service_milvus",
            "service_overload",
            "service_redis_faults",
            "service_reload",
            "service_searcher",
            "service_tracing",
            "train_serve_parity",
            "training_tracking",
        ],
        INTEGRATION,
    ),
    # end-to-end: the CLI as a user runs it, torchrun, the demo, the study, karma bench, a fuzzed server
    **dict.fromkeys(["bench", "cli", "service_fuzz", "study", "trainer"], E2E),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(tier) for tier in (UNIT, INTEGRATION, E2E)):
            continue
        name = Path(str(item.fspath)).stem.removeprefix("test_")
        if name not in TIERS:
            raise pytest.UsageError(f"{item.fspath}: no test tier; add it to TIERS in tests/conftest.py")
        item.add_marker(getattr(pytest.mark, TIERS[name]))


# ---- the tiny bundle as the service tests use it ------------------------------------------------


@pytest.fixture(scope="session")
def bundle_dir(tiny_export: tuple[Path, Path]) -> Path:
    return tiny_export[1]


@pytest.fixture(scope="session")
def reference(bundle_dir: Path) -> dict[str, Any]:
    """The bundle and its own ORT sessions, for computing results directly (no service)."""
    bundle = load_bundle(bundle_dir)
    return {"bundle": bundle, "sessions": bundle.open_sessions(intra_op_threads=1)}


@pytest.fixture
def prefix() -> Iterator[str]:
    """A Redis key prefix of this test alone; its keys are deleted afterwards."""
    name = f"karma-test-{uuid.uuid4().hex[:12]}-"
    yield name
    if redis_up():
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{name}*"))
        if keys:
            client.delete(*keys)
        assert not list(client.scan_iter(match=f"{name}*"))
