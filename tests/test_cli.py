"""The `karma` command line, end to end, as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

from karma.config import profile_overrides
from tests.helpers import KARMA_BIN

TINY = [arg for item in profile_overrides() for arg in ("--set", item)]  # configs/tiny.yaml


def run_karma(*args: str, env_artifacts: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KARMA_BIN, *args, "--set", f"paths.artifacts={env_artifacts}"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_runs_data_split_features_stats(tmp_path: Path) -> None:
    result = run_karma("demo", *TINY, env_artifacts=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for step in (
        "[1/7]",
        "[2/7]",
        "[3/7]",
        "[4/7]",
        "[5/7]",
        "[6/7]",
        "[7/7]",
        "POST http://127.0.0.1:",
        "history from Redis: 10 items",
        "parity",
        "KARMA karma",
        "most-popular",
        "demo: done",
        "plots (",
        "serve it:",
        "serve --bundle ",
    ):
        assert step in out
    assert "1,000 x 160 [text:hashing-128=128, visual:data=32]" in out
    assert "split protocol" in out
    # The second run reads the cached data set and features instead of regenerating them.
    again = run_karma("demo", *TINY, env_artifacts=tmp_path)
    assert again.returncode == 0 and "cached at" in again.stderr


def test_features_command_writes_layout(tmp_path: Path) -> None:
    result = run_karma("data", "features", "synthetic", *TINY, env_artifacts=tmp_path)
    assert result.returncode == 0, result.stderr
    layouts = list(tmp_path.glob("data/synthetic-*/features/layout.json"))
    assert len(layouts) == 1


def test_bad_override_is_one_line(tmp_path: Path) -> None:
    result = run_karma("data", "stats", "--set", "data.synthetic.n_itemz=5", env_artifacts=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: override 'data.synthetic.n_itemz=5': unknown config key")


def test_unknown_dataset_is_one_line(tmp_path: Path) -> None:
    result = run_karma("data", "stats", "ml-20m", env_artifacts=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: unknown data set 'ml-20m'; known: synthetic, ml-100k, ml-1m, recbole:<dir>, taobao-userbehavior:<csv>"
    )


def test_evaluate_a_checkpoint_and_refuse_architecture_overrides(tmp_path: Path) -> None:
    trained = run_karma("train", *TINY, "--preset", "action-only", env_artifacts=tmp_path)
    assert trained.returncode == 0, trained.stderr
    checkpoint = tmp_path / "runs" / "action-only-synthetic" / "checkpoint"
    result = subprocess.run(
        [KARMA_BIN, "evaluate", str(checkpoint), "--which", "valid", "--set", "eval.max_users=50"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "KARMA action-only" in result.stdout and "split=valid" in result.stdout and "users=50" in result.stdout
    assert (checkpoint.parent / "eval_valid.json").exists()
    env = {**os.environ, "KARMA_EVAL__MAX_USERS": "40"}  # the env layer holds for evaluate too
    by_env = subprocess.run(
        [KARMA_BIN, "evaluate", str(checkpoint.parent), "--split", "valid"], capture_output=True, text=True, env=env
    )
    assert by_env.returncode == 0 and "users=40" in by_env.stdout, by_env.stderr
    refused = subprocess.run(
        [KARMA_BIN, "evaluate", str(checkpoint), "--set", "model.embed_dim=8"], capture_output=True, text=True
    )
    assert refused.returncode == 2
    assert refused.stderr.strip() == "error: evaluate: only eval.* and paths.* may be overridden, not 'model.embed_dim'"


def test_train_never_overwrites_a_run_silently(tmp_path: Path) -> None:
    """A second `karma train` into a finished run is refused before any work; --resume/--force/--run-name pass."""
    first = run_karma("train", *TINY, "--preset", "action-only", env_artifacts=tmp_path)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "runs" / "action-only-synthetic"  # the default run name: <preset>-<data set>
    state = run / "checkpoint" / "trainer_state.json"
    assert state.is_file() and "run folder" in first.stdout
    stamp = state.stat().st_mtime_ns

    again = run_karma("train", *TINY, "--preset", "action-only", env_artifacts=tmp_path)
    assert again.returncode == 2 and again.stderr.count("error:") == 1, again.stderr
    assert "already holds a checkpoint (step 8)" in again.stderr and "--resume" in again.stderr
    assert "Traceback" not in again.stderr and state.stat().st_mtime_ns == stamp  # untouched

    other = run_karma("train", *TINY, "--preset", "karma", env_artifacts=tmp_path)  # its own folder
    assert other.returncode == 0, other.stderr
    assert (tmp_path / "runs" / "karma-synthetic" / "checkpoint").is_dir() and state.stat().st_mtime_ns == stamp
    both = run_karma("train", *TINY, "--resume", "--force", env_artifacts=tmp_path)
    assert both.returncode == 2 and "pass one of them" in both.stderr
    replaced = run_karma("train", *TINY, "--preset", "action-only", "--force", env_artifacts=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert state.stat().st_mtime_ns != stamp


def test_checkpoints_store_absolute_paths_and_run_names_are_checked(tmp_path: Path) -> None:
    import pytest

    from karma.config import load_config
    from karma.errors import ConfigError
    from training.trainer import run_dir, with_absolute_paths

    config = load_config(overrides=["paths.artifacts=rel/artifacts", "loss.preset=recon"], environ={})
    absolute = with_absolute_paths(config)
    assert absolute.paths.artifacts.is_absolute() and not config.paths.artifacts.is_absolute()
    assert run_dir(absolute) == Path.cwd() / "rel" / "artifacts" / "runs" / "recon-synthetic"
    with pytest.raises(ConfigError, match="run_name"):
        load_config(overrides=["train.run_name=../escape"], environ={})


def test_serve_on_a_port_in_use_is_one_line_before_loading(tiny_export: tuple[Path, Path]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [KARMA_BIN, "serve", "--bundle", str(tiny_export[1]), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: karma serve: cannot listen on 127.0.0.1:{port} (Address already in use); pick another with --port"
    )


def test_baselines_with_an_unknown_name_is_one_line_before_any_work(tmp_path: Path) -> None:
    result = run_karma("baselines", "synthetic", "--which", "popular,foo", env_artifacts=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --which: unknown baseline(s) ['foo']; known: popular, sasrec, content"
    assert not (tmp_path / "data").exists()  # refused before the data set was built


def test_baselines_is_a_typer_command_with_one_flag_per_sasrec_knob(tmp_path: Path) -> None:
    help_text = run_karma("baselines", "--help", env_artifacts=tmp_path)
    assert help_text.returncode == 0 and "Usage: karma baselines" in help_text.stdout
    for flag in ("--which", "--split", "--json", "--epochs", "--max-cpu-seconds", "--max-windows-per-user"):
        assert flag in help_text.stdout, flag
    bad = run_karma("baselines", "synthetic", "--epochs", "many", env_artifacts=tmp_path)
    assert bad.returncode == 2 and "Invalid value for '--epochs'" in bad.stderr and "Traceback" not in bad.stderr
    out = tmp_path / "popular.json"
    ok = run_karma("baselines", "synthetic", *TINY, "--which", "popular", "--json", str(out), env_artifacts=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert set(json.loads(out.read_text())["results"]) == {"popular"}


def test_study_takes_its_file_as_an_argument_or_option(tmp_path: Path) -> None:
    for args in (["study", str(tmp_path / "nope.yaml")], ["study", "--config", str(tmp_path / "nope.yaml")]):
        result = run_karma(*args, env_artifacts=tmp_path)
        assert result.returncode == 2 and result.stderr.strip().startswith("error: study file"), result.stderr
    neither = run_karma("study", env_artifacts=tmp_path)
    assert neither.returncode == 2 and "give one study file" in neither.stderr


def test_every_command_reads_the_environment_layer(tmp_path: Path, tiny_export: tuple[Path, Path]) -> None:
    """defaults < file < KARMA_* env < --set in every command: a bad env value is refused, naming the variable."""
    checkpoint, bundle = tiny_export
    bad_level = {"KARMA_LOG_LEVEL": "LOUD"}
    cases = [
        (["train"], bad_level),
        (["demo"], bad_level),
        (["data", "stats", "synthetic"], bad_level),
        (["config", "show"], bad_level),
        (["serve", "--bundle", str(bundle)], bad_level),
        (["baselines", "synthetic", "--which", "popular"], bad_level),
        (["bench", "--quick"], bad_level),
        (["study", "studies/smoke.yaml"], bad_level),
        (["diagnose", str(checkpoint)], bad_level),
        (["export", str(checkpoint), "--out", str(tmp_path / "b")], bad_level),
        (["evaluate", str(checkpoint)], {"KARMA_EVAL__MAX_USERS": "some"}),  # the checkpoint fixes the rest
    ]
    for args, env in cases:
        result = subprocess.run(
            [KARMA_BIN, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
        )
        name = next(iter(env))
        assert result.returncode == 2, (args, result.stdout[-500:], result.stderr[-500:])
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: environment variable {name}"), (
            args,
            result.stderr[-500:],
        )
    assert not (tmp_path / "b").exists()
    # and an allowed env override really applies in export (a location: where the data cache would go)
    moved = subprocess.run(
        [KARMA_BIN, "export", str(checkpoint), "--out", str(tmp_path / "b2")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KARMA_MODEL__EMBED_DIM": "8", "KARMA_TRAIN__THREADS": "1"},
    )
    assert moved.returncode == 0, moved.stderr  # model.* from the env is not for export: ignored, not applied
