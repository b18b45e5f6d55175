"""The training recipe end to end: every preset trains and evaluates, resume is exact, torchrun works."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from karma.config import load_config
from tests.helpers import tiny_train_overrides
from training.trainer import CHECKPOINT_DIR, METRICS_LOG, run_dir, train


@pytest.mark.parametrize("preset", ["action-only", "karma"])
def test_preset_trains_checkpoints_and_evaluates(preset: str, tmp_path: Path) -> None:
    config = load_config(overrides=[*tiny_train_overrides(tmp_path), f"loss.preset={preset}"], environ={})
    result = train(config, progress=False)
    out = run_dir(config)
    log = [json.loads(line) for line in (out / METRICS_LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert {r["stage"] for r in log} == {"warmup", "action"}
    assert ("img" in log[-1]) == (preset == "karma")
    metrics = result["metrics"]["results"]
    karma = metrics[f"KARMA {preset}"]
    assert set(karma) == {"all", "warm", "cold"}  # the synthetic data has a cold split
    assert 0.0 <= karma["all"]["HR@200"] <= 1.0 and karma["all"]["count"] == 100
    assert "full ranking over all 1000 catalog items" in result["metrics"]["protocol"]
    assert (out / "training_curves.png").stat().st_size > 1000
    assert (out / CHECKPOINT_DIR / "model.safetensors").exists()


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    base = tiny_train_overrides(tmp_path)
    straight = load_config(overrides=[*base, "train.run_name=straight"], environ={})
    split = load_config(overrides=[*base, "train.run_name=split"], environ={})
    train(straight, progress=False)
    train(split, progress=False, stop_after=4)  # interrupted after the warm-up + 2 action steps
    train(split, resume=True, progress=False)
    a = load_file(run_dir(straight) / CHECKPOINT_DIR / "model.safetensors")
    b = load_file(run_dir(split) / CHECKPOINT_DIR / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_a, log_b = (
        [{k: v for k, v in json.loads(line).items() if k != "cpu_seconds"} for line in path.read_text().splitlines()]
        for path in (run_dir(straight) / METRICS_LOG, run_dir(split) / METRICS_LOG)
    )
    assert log_a == log_b  # every logged value but the CPU clock


def test_two_process_torchrun_on_cpu(tmp_path: Path) -> None:
    overrides = [*tiny_train_overrides(tmp_path), "train.run_name=ddp", "loss.preset=karma-text"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "recipes.cli", "train", *[arg for o in overrides for arg in ("--set", o)],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    config = load_config(overrides=overrides, environ={})
    state = json.loads((run_dir(config) / CHECKPOINT_DIR / "trainer_state.json").read_text())
    assert state == {"step": 8, "preset": "karma-text", "world_size": 2}
    assert (run_dir(config) / "metrics.json").exists()


@pytest.mark.parametrize(
    "options",
    [
        ["loss.act=pairwise"],
        ["loss.negatives=sampled", "loss.sampled_negatives=64"],
        ["loss.catalog_refresh_every=3", "loss.learn_temperature=true"],
        ["train.targets=last"],
        ["loss.img_condition=history", "features.item_ids=none"],
    ],
    ids=["pairwise", "sampled", "cached-catalog-learned-temperature", "single-target", "history-condition-no-ids"],
)
def test_training_variants_run_and_log_finite_losses(options: list[str], tmp_path: Path) -> None:
    config = load_config(overrides=[*tiny_train_overrides(tmp_path), "loss.preset=karma", *options], environ={})
    result = train(config, progress=False, evaluate_at_end=False)
    records = [json.loads(line) for line in (run_dir(config) / METRICS_LOG).read_text().splitlines()]
    action = [r for r in records if r["stage"] == "action"]
    assert len(action) == config.train.steps
    for r in action:
        for key in ("act", "gen", "recon", "img", "total"):
            assert math.isfinite(r[key]), (key, r)
    per_window = 1 if config.train.targets == "last" else 2  # every-position windows hold several targets
    assert result["targets"] >= per_window * config.train.steps * config.train.batch_size
    if config.loss.learn_temperature:
        assert action[-1]["logit_scale"] != action[0]["logit_scale"]  # the temperature is learned
