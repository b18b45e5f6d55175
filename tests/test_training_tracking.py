"""The training log fans out to TensorBoard (and MLflow when installed); a missing or failing tracker never stops it."""

from __future__ import annotations

import builtins
import json
import logging
import time
from pathlib import Path

import pytest

from karma.config import load_config
from tests.helpers import tiny_train_overrides
from training.tracking import TENSORBOARD_DIR, Tracker, flat_params, scalars
from training.trainer import METRICS_LOG, run_dir, train


def block_imports(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make `import X` (and `from X import ...`, X.sub) fail for these modules, imported before or not."""
    real_import = builtins.__import__

    def guarded(name: str, *args, **kwargs):
        if any(name == m or name.startswith(m + ".") for m in modules):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected_scalars(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for tag, value in scalars(record).items():
            expected.setdefault(tag, []).append((record["step"], value))
    return expected


def assert_same(got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]]) -> None:
    assert got.keys() == want.keys()
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32


def test_tensorboard_holds_the_jsonl_scalars_and_progress_lines_stay_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tensorboard")
    config = load_config(overrides=[*tiny_train_overrides(tmp_path), "train.eval_every=3"], environ={})
    train(config, progress=True, evaluate_at_end=False)  # stderr is pytest's capture: not a TTY
    records = read_jsonl(run_dir(config) / METRICS_LOG)
    got = tensorboard_scalars(run_dir(config) / TENSORBOARD_DIR)
    assert_same(got, expected_scalars(records))
    assert [s for s, _ in got["train/total"]] == list(range(1, 9))  # warm-up and action steps
    assert [s for s, _ in got["valid/HR@10"]] == [3, 6]  # the eval records (action steps 3 and 6)
    assert {"train/act", "train/warmup", "train/grad_norm", "train/lr_heads", "eval/targets_seen"} <= got.keys()
    err = capsys.readouterr().err
    assert "train:" in err and "\r" not in err
    assert all(len(line) < 300 for line in err.splitlines()), max(err.splitlines(), key=len)


def test_resumed_run_appends_to_tensorboard_and_purges_what_a_killed_run_wrote(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    config = load_config(overrides=tiny_train_overrides(tmp_path), environ={})
    train(config, progress=False, stop_after=4, evaluate_at_end=False)
    # A killed run had logged two steps past its checkpoint (step 4) before it died.
    ghost = SummaryWriter(str(run_dir(config) / TENSORBOARD_DIR))
    for step in (5, 6):
        ghost.add_scalar("train/total", 1e6, step)
    ghost.close()
    time.sleep(1.05)  # event files are read in name (= creation second) order
    train(config, resume=True, progress=False, evaluate_at_end=False)
    records = read_jsonl(run_dir(config) / METRICS_LOG)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert_same(tensorboard_scalars(run_dir(config) / TENSORBOARD_DIR), expected_scalars(records))


def test_training_completes_without_tensorboard_or_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    block_imports(monkeypatch, "mlflow", "torch.utils.tensorboard")
    config = load_config(overrides=[*tiny_train_overrides(tmp_path), "train.log_mlflow=true"], environ={})
    with caplog.at_level(logging.WARNING, logger="training.tracking"):
        result = train(config, progress=False, evaluate_at_end=False)
    assert result["steps_done"] == 8
    assert [r["step"] for r in read_jsonl(run_dir(config) / METRICS_LOG)] == list(range(1, 9))
    warnings = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("TensorBoard logging is off") for m in warnings), warnings
    assert any(m.startswith("MLflow logging is off") for m in warnings), warnings
    assert not (run_dir(config) / TENSORBOARD_DIR).exists() and not (run_dir(config) / "mlruns").exists()


def test_mlflow_auto_skips_quietly_when_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from training.tracking import open_tracker

    block_imports(monkeypatch, "mlflow")
    config = load_config(overrides=[*tiny_train_overrides(tmp_path), "train.log_tensorboard=false"], environ={})
    assert config.train.log_mlflow == "auto"
    with caplog.at_level(logging.WARNING, logger="training.tracking"):
        tracker = open_tracker(config, tmp_path / "run", "run", start_step=0, resuming=False)
    assert tracker.sinks == [] and caplog.records == []
    tracker.close()


def test_a_failing_sink_is_warned_about_once_and_dropped(caplog: pytest.LogCaptureFixture) -> None:
    class Full:
        name = "Full"
        closed: list[str] = []  # noqa: RUF012

        def log(self, step: int, values: dict[str, float]) -> None:
            raise OSError(28, "No space left on device")

        def close(self, status: str) -> None:
            self.closed.append(status)

    class Good:
        name = "Good"

        def __init__(self) -> None:
            self.seen: list[tuple[int, dict[str, float]]] = []

        def log(self, step: int, values: dict[str, float]) -> None:
            self.seen.append((step, values))

        def close(self, status: str) -> None:
            self.seen.append((-1, {status: 0.0}))

    full, good = Full(), Good()
    tracker = Tracker([full, good])
    with caplog.at_level(logging.WARNING, logger="training.tracking"):
        for step in (1, 2):
            tracker.log({"step": step, "stage": "action", "total": 0.5, "valid": {"HR@10": 0.25}})
    assert len(caplog.records) == 1 and "Full logging failed" in caplog.records[0].getMessage()
    assert full.closed == ["FAILED"] and tracker.sinks == [good]
    tracker.close(finished=False)
    assert good.seen == [
        (1, {"train/total": 0.5, "valid/HR@10": 0.25}),
        (2, {"train/total": 0.5, "valid/HR@10": 0.25}),
        (-1, {"RUNNING": 0.0}),
    ]


def test_mlflow_params_are_the_flattened_config_without_secrets() -> None:
    config = load_config(overrides=["serve.api_key=0123456789abcdef0123"], environ={})
    params = flat_params(config)
    assert params["train.steps"] == "150" and params["data.synthetic.interests_per_user"] == "[2, 4]"
    assert params["train.log_mlflow"] == "auto" and params["train.run_name"] == "null"
    assert not any(key.startswith("serve.") for key in params)


def test_mlflow_gets_params_and_metrics_and_a_resumed_run_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")  # never a dependency: runs where MLflow is installed
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    # No folder named `artifacts` on the way: MLflow 3's file store (mlflow-skinny) finds no runs under one.
    overrides = [*tiny_train_overrides(tmp_path), f"paths.artifacts={tmp_path / 'store'}", "train.eval_every=3"]
    config = load_config(overrides=[*overrides, "train.log_tensorboard=false"], environ={})
    train(config, progress=False, stop_after=4, evaluate_at_end=False)
    train(config, resume=True, progress=False, evaluate_at_end=False)
    saved = json.loads((run_dir(config) / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "karma-synthetic"
    assert run.data.params["train.steps"] == "6" and run.data.params["loss.preset"] == "karma"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the resumed run went on in the same MLflow run
    records = read_jsonl(run_dir(config) / METRICS_LOG)
    want = expected_scalars(records)
    history = {tag: client.get_metric_history(run.info.run_id, tag.replace("@", "_")) for tag in want}
    assert_same({tag: sorted((m.step, m.value) for m in got) for tag, got in history.items()}, want)
