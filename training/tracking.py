"""Experiment trackers beside train_log.jsonl: TensorBoard, and MLflow when it is installed.

The JSONL log stays the record of a run (plots, studies and tests read it). `open_tracker` fans each
record written to it out to the sinks `train.log_tensorboard` and `train.log_mlflow` turn on:

- TensorBoard (`torch.utils.tensorboard`, the `tensorboard` package of the `train` extra) writes event
  files under `<run dir>/tensorboard/`: `tensorboard --logdir artifacts/runs` shows every run.
- MLflow (never a dependency: used only when `mlflow` imports) logs the run's config as params and the
  records as metrics by step, to `MLFLOW_TRACKING_URI` (and `MLFLOW_EXPERIMENT_NAME`, default `karma`),
  else to a store of the run's own in `<run dir>/mlruns/` (`mlflow ui --backend-store-uri <that URI>`; the
  log names it): an SQLite `mlflow.db` when SQLAlchemy is installed (the full `mlflow` package), else
  MLflow's file store. MLflow 3 keeps the file store in maintenance mode (this sets
  `MLFLOW_ALLOW_FILE_STORE=true` unless given) and does not find runs in it under a folder named
  `artifacts` (as `paths.artifacts` is by default), so `mlflow-skinny` needs `MLFLOW_TRACKING_URI`. A
  resumed run continues the same MLflow run.

Scalar names: a training record's `act`, `total`, `grad_norm`, `lr_heads`... become `train/<key>`, an
eval record's validation metrics `valid/<metric>` (`valid/HR@200`; MLflow keys cannot hold `@`:
`valid/HR_200`) and its other numbers `eval/<key>`; the step is the record's `step`.

A tracker is a side channel: a sink that cannot start (not installed, unwritable folder) or fails
later (disk full, tracking server down) logs one warning and is dropped; training never stops for it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import weakref
from pathlib import Path
from typing import Any, Protocol

from karma.config import SECRET_KEYS, KarmaConfig, dotted_items

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
MLFLOW_RUN_FILE = "mlflow_run.json"  # the MLflow run a resumed training continues
MLFLOW_EXPERIMENT = "karma"
PARAM_SECTIONS = ("seed", "data", "features", "model", "loss", "train", "eval", "paths")  # not serve.*
_MLFLOW_UNSAFE = re.compile(r"[^\w\-. /:]")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers by scalar name (see the module docstring); `step` and `stage` are not scalars."""
    prefix = "eval" if record.get("stage") == "eval" else "train"
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "stage"):
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if _is_number(v)})
        elif _is_number(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def flat_params(config: KarmaConfig) -> dict[str, str]:
    """The config as `section.key` -> text (MLflow params), secrets and the service section left out."""
    tree = config.model_dump(mode="json")
    for section, key in SECRET_KEYS:
        tree.get(section, {}).pop(key, None)
    kept = {k: v for k, v in tree.items() if k in PARAM_SECTIONS}
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in dotted_items(kept)}


class Sink(Protocol):
    name: str

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, status: str) -> None:
        """status: FINISHED (training ended), RUNNING (stopped to be resumed) or FAILED (never closed)."""


class TensorBoardSink:
    name = "TensorBoard"

    def __init__(self, log_dir: Path, config: KarmaConfig, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        # purge_step: on resume, TensorBoard hides the events a killed run wrote past the checkpoint.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)
        if purge_step is None:
            self.writer.add_text("config", "```\n" + json.dumps(flat_params(config), indent=1) + "\n```")

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self, status: str) -> None:
        self.writer.close()


def local_store(folder: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location) of a run's own MLflow store in `folder` (see the module docstring)."""
    folder = folder.absolute()
    try:
        import alembic  # noqa: F401  (MLflow's SQL store needs both; mlflow-skinny has neither)
        import sqlalchemy  # noqa: F401
    except ImportError:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # we chose the file store: MLflow 3 asks
        return folder.as_uri(), None
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


class MLflowSink:
    name = "MLflow"

    def __init__(self, out_dir: Path, config: KarmaConfig, name: str, resuming: bool):
        from mlflow.entities import Param  # ImportError when MLflow is not installed
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifact_location = None  # a tracking server's (or the user's store's) own default
        if not uri:
            uri, artifact_location = local_store(out_dir / MLFLOW_DIR)
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = self._previous_run(out_dir / MLFLOW_RUN_FILE, uri) if resuming else None
        if self.run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
            run = self.client.create_run(experiment_id, run_name=name, tags={"karma.run_dir": str(out_dir)})
            self.run_id = run.info.run_id
            params = [Param(k, v[:500]) for k, v in flat_params(config).items()]  # 500: MLflow's oldest limit
            for start in range(0, len(params), 100):  # at most 100 params per request
                self.client.log_batch(self.run_id, params=params[start : start + 100])
            (out_dir / MLFLOW_RUN_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        log.info("MLflow: run %s at %s", self.run_id, uri)

    def _previous_run(self, path: Path, uri: str) -> str | None:
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if saved.get("tracking_uri") != uri:
            return None
        try:
            return self.client.get_run(saved["run_id"]).info.run_id
        except Exception:  # deleted, or another store: start a new run
            return None

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_UNSAFE.sub("_", k), v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str) -> None:
        if status != "RUNNING":
            self.client.set_terminated(self.run_id, status=status)


class Tracker:
    """Hands every training record to its sinks; a failing sink is warned about once and dropped."""

    def __init__(self, sinks: list[Sink] | None = None):
        self.sinks: list[Sink] = list(sinks or [])
        # A run that dies before close() still gets its event files flushed (at exit) and MLflow FAILED.
        self._finalizer = weakref.finalize(self, _close_sinks, self.sinks, "FAILED")

    def log(self, record: dict[str, Any]) -> None:
        if not self.sinks:
            return
        step, values = int(record["step"]), scalars(record)
        for sink in list(self.sinks):
            try:
                sink.log(step, values)
            except Exception as exc:
                log.warning("%s logging failed (%s: %s): it is off for the rest of the run", sink.name, _kind(exc), exc)
                self.sinks.remove(sink)
                _close_sinks([sink], "FAILED")

    def close(self, finished: bool = True) -> None:
        """Flush and close every sink; `finished=False` (stopped to be resumed) leaves an MLflow run open."""
        self._finalizer.detach()
        _close_sinks(self.sinks, "FINISHED" if finished else "RUNNING")
        self.sinks.clear()


def _close_sinks(sinks: list[Sink], status: str) -> None:
    for sink in sinks:
        try:
            sink.close(status)
        except Exception as exc:
            log.warning("%s did not close cleanly (%s: %s)", sink.name, _kind(exc), exc)


def _kind(exc: BaseException) -> str:
    return type(exc).__name__


def open_tracker(config: KarmaConfig, out_dir: Path, name: str, start_step: int, resuming: bool) -> Tracker:
    """The sinks config.train asks for; one that cannot start is skipped with a warning."""
    t = config.train
    sinks: list[Sink] = []
    if t.log_tensorboard:
        try:
            sinks.append(TensorBoardSink(out_dir / TENSORBOARD_DIR, config, start_step + 1 if resuming else None))
        except Exception as exc:
            log.warning(
                "TensorBoard logging is off (%s: %s); the tensorboard package comes with the train extra, "
                "train.log_tensorboard=false turns this off",
                _kind(exc),
                exc,
            )
    if t.log_mlflow:
        try:
            sinks.append(MLflowSink(out_dir, config, name, resuming))
        except ImportError as exc:
            if t.log_mlflow is True:  # asked for explicitly; "auto" skips quietly
                log.warning("MLflow logging is off: %s (pip install mlflow, or train.log_mlflow=auto)", exc)
            else:
                log.debug("MLflow is not installed: train.log_mlflow=auto skips it")
        except Exception as exc:
            log.warning("MLflow logging is off (%s: %s)", _kind(exc), exc)
    return Tracker(sinks)
