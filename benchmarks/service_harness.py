"""Shared by the service benchmarks: build a tiny bundle with the CLI, run `karma serve`, clean Redis.

Everything runs through the real command-line tools (`karma train`, `karma export`, `karma serve`)
in subprocesses, single-threaded (1 torch / ORT / BLAS thread), with outputs under a work folder.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from service import launcher

KARMA = str(Path(sys.executable).with_name("karma"))
REPO = Path(__file__).resolve().parents[1]
THREAD_ENV = launcher.THREAD_ENV

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


def _run(command: list[str], what: str) -> None:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env={**os.environ, **THREAD_ENV}, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"  {what}: {time.perf_counter() - started:.1f} s", file=sys.stderr)


def build_bundle(workdir: Path, overrides: list[str]) -> Path:
    """`karma train` + `karma export` into `workdir` (artifacts/ and bundle/); returns the bundle folder."""
    artifacts = workdir / "artifacts"
    sets = [f"paths.artifacts={artifacts}", "train.run_name=bench", *overrides]
    _run([KARMA, "train", *[arg for s in sets for arg in ("--set", s)]], "karma train")
    bundle = workdir / "bundle"
    _run([KARMA, "export", str(artifacts / "runs" / "bench" / "checkpoint"), "--out", str(bundle)], "karma export")
    return bundle


def karma_serve(bundle: Path, redis_url: str, sets: list[str] = (), env: dict[str, str] | None = None,
                timeout_s: float = 120) -> contextlib.AbstractContextManager[tuple[str, str]]:  # fmt: skip
    """`service.launcher.karma_serve`, run from the repository root."""
    return launcher.karma_serve(bundle, redis_url, sets, env, timeout_s, cwd=REPO)
