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

from karma.config import profile_overrides
from karma.errors import KarmaError
from karma.machine import THREAD_ENV
from service import launcher

KARMA = str(Path(sys.executable).with_name("karma"))
REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("karma.bench")

# The seconds-scale profile (configs/tiny.yaml): tiny backbone, hashing text features, 1k items, short training.
TINY = profile_overrides()


def log_steps_to_stderr() -> None:
    """For the benchmark scripts: show this module's step lines ("karma train bench: 9.1 s") on stderr."""
    logging.basicConfig(level=logging.INFO, format="  %(message)s")


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
