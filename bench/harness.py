"""Build bundles with the real CLI and run servers as their own processes (used by `karma bench` and benchmarks/).

Everything runs through the real command-line tools (`karma train`, `karma export`, `karma serve`)
in subprocesses, single-threaded (1 torch / ORT / BLAS thread), with outputs under a work folder.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from karma.errors import KarmaError
from service import launcher

KARMA = str(Path(sys.executable).with_name("karma"))
REPO = Path(__file__).resolve().parents[1]
THREAD_ENV = launcher.THREAD_ENV

log = logging.getLogger("karma.bench")

# A seconds-scale model: tiny backbone, hashing text features, short training.
TINY = [
    "data.max_history=20",
    "features.text_encoder=hashing",
    "features.threads=1",
    "model.tiny_hidden=32",
    "model.embed_dim=32",
    "model.item_tower_hidden=64",
    "loss.sampled_negatives=32",
    "loss.flow_hidden=64",
    "train.threads=1",
    "train.batch_size=16",
    "train.steps=6",
    "train.semantic_warmup_steps=2",
    "train.warmup_steps=2",
    "train.checkpoint_every=1000000",
    "eval.max_users=100",
]
SMALL_DATA = ["data.synthetic.n_items=1000", "data.synthetic.n_users=300", "data.synthetic.n_events=6000"]


def run_tool(command: list[str], what: str) -> float:
    """Run one CLI step from the repository root; raise KarmaError with its output tail if it fails."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env={**os.environ, **THREAD_ENV}, capture_output=True, text=True)
    if result.returncode != 0:
        raise KarmaError(f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    log.info("%s: %.1f s", what, seconds)
    return seconds


def build_bundle(workdir: Path, overrides: Sequence[str], run_name: str = "bench", preset: str | None = None) -> Path:
    """`karma train` + `karma export` into `workdir` (artifacts/ and <run_name>-bundle/); returns the bundle folder.

    The checkpoint stays at `checkpoint_of(workdir, run_name)`.
    """
    sets = [f"paths.artifacts={workdir / 'artifacts'}", f"train.run_name={run_name}", *overrides]
    train = [KARMA, "train", *(("--preset", preset) if preset else ()), *[arg for s in sets for arg in ("--set", s)]]
    run_tool(train, f"karma train {run_name}")
    bundle = workdir / (f"{run_name}-bundle" if run_name != "bench" else "bundle")
    export = [KARMA, "export", str(checkpoint_of(workdir, run_name)), "--out", str(bundle), "--force"]
    run_tool(export, f"karma export {run_name}")
    return bundle


def checkpoint_of(workdir: Path, run_name: str = "bench") -> Path:
    return workdir / "artifacts" / "runs" / run_name / "checkpoint"


# `service.launcher.karma_serve`, run from the repository root (`entry=`: another server with the same options).
karma_serve = partial(launcher.karma_serve, cwd=REPO)
