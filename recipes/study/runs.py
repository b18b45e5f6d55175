"""One study run (train → evaluate → diagnose → export) and one baseline, each cached on disk.

A run's folder (`<artifacts>/runs/<preset>-s<seed>`) is the trainer's run folder plus
`study_run.json`, written last and atomically: its presence means the run is complete. Both it and
`study_signature.json` (written when the run starts) record the run's signature, every config value
that decides its result; a folder holding a run of another configuration is refused rather than
silently mixed into a table. An interrupted run resumes from its last checkpoint
(`karma train --resume` semantics), so a study can be stopped and restarted at any point.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from karma.config import KarmaConfig
from karma.errors import KarmaError
from karma.jsonable import to_jsonable
from karma.machine import machine
from recipes.study.config import StudyConfig
from training.evaluation import eval_targets, protocol_for
from training.evaluation.metrics import rank_targets
from training.evaluation.popularity import split_buckets
from training.evaluation.report import segment_metrics

log = logging.getLogger(__name__)

RUN_RESULT = "study_run.json"
ADOPTED_KEY = "adopted"  # stamp of a record written back by `karma study --adopt` (numbers only, no artifacts)
RUN_SIGNATURE = "study_signature.json"
RUN_WALL_LOG = "study_wall.jsonl"
RANKS_FILE = "ranks_test.npz"
DIAGNOSTICS_FILE = "study_diagnostics.json"
BUNDLE_DIR = "bundle"


# Knobs that change how a run executes, not what it learns or how it is measured: a run may be
# resumed with more threads or another checkpoint interval and still be the same run.
NOT_SIGNIFICANT = frozenset(
    {"train.threads", "train.checkpoint_every", "train.eval_every", "train.device", "eval.batch_size"}
)
SIGNIFICANT_SECTIONS = ("seed", "data", "features", "model", "loss", "train", "eval")


def signature(config: KarmaConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Flat {dotted key: value} of everything that decides a run's result (plus `extra`, e.g. SASRec settings)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
        elif prefix not in NOT_SIGNIFICANT:
            flat[prefix] = value

    dump = config.model_dump(mode="json")
    for section in SIGNIFICANT_SECTIONS:
        walk(section, dump[section])
    for key, value in (extra or {}).items():
        walk(f"extra.{key}", value)
    return flat


def signature_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ; a key only one side has (a field added since, at its default) is ignored."""
    return [
        f"{k}: {stored[k]!r} -> {current[k]!r}" for k in sorted(set(stored) & set(current)) if stored[k] != current[k]
    ]


def same_signature(stored: Mapping[str, Any] | None, current: Mapping[str, Any]) -> bool:
    return stored is not None and not signature_differences(stored, current)


def baseline_signature(config: KarmaConfig, name: str, sasrec: Mapping[str, Any]) -> dict[str, Any]:
    """Signature of a baseline on the study's data and protocol (SASRec's own settings included)."""
    return signature(config, {"baseline": name, **(sasrec if name == "sasrec" else {})})


def finished_record(path: Path, current: Mapping[str, Any]) -> dict[str, Any] | None:
    """The result stored at `path` when it exists and was made with the `current` signature, else None."""
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if same_signature(result.get("signature"), current) else None


def write_json(path: Path, payload: Any) -> None:
    """Strict JSON, written to a temporary file and renamed (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _claim(run: Path, current: Mapping[str, Any]) -> None:
    """Record the run's signature, refusing a folder that holds a run of another configuration."""
    marker = run / RUN_SIGNATURE
    if marker.exists():
        differences = signature_differences(json.loads(marker.read_text()), current)
        if differences:
            raise KarmaError(
                f"{run} holds a run of a different configuration ({'; '.join(differences[:5])}); "
                "delete that folder or give the study another artifacts folder"
            )
    write_json(marker, current)


def save_ranks(
    path: Path, ranks: torch.Tensor | np.ndarray, targets: Any, cold: np.ndarray | None, buckets: np.ndarray
) -> None:
    """ranks (0-based, one per evaluated user), their target items, whether each target is cold and
    its popularity bucket (index into BUCKETS, -1 = cold): what the report's intervals resample."""
    arrays = {
        "ranks": np.asarray(ranks, dtype=np.int64),
        "target_items": np.asarray(targets.items),
        "bucket": np.asarray(buckets, dtype=np.int8)[targets.items],
    }
    if cold is not None and np.asarray(cold).any():
        arrays["cold"] = np.asarray(cold, dtype=bool)[targets.items]
    np.savez_compressed(path, **arrays)


def evaluate_ranks(setup: Any) -> tuple[np.ndarray, dict[str, Any], str]:
    """0-based test ranks of every evaluated user, their metrics (all/warm/cold) and the protocol line."""
    from training.setup import embed_items, embed_users
    from training.trainer import run_dir

    cfg = setup.config
    targets = eval_targets(setup.split, "test", cfg.eval.exclude_history, cfg.eval.max_users)
    users = embed_users(setup, targets.positions, cfg.eval.batch_size)
    ranks = _ranks(users, embed_items(setup), targets, cfg)
    cold = setup.dataset.catalog.cold
    buckets = split_buckets(setup.split, len(setup.dataset.catalog.items), cold)
    metrics = segment_metrics(ranks, targets.items, cold, cfg.eval.ks, buckets)
    save_ranks(run_dir(cfg) / RANKS_FILE, ranks, targets, cold, buckets)
    protocol = protocol_for(cfg, setup.dataset, "test", targets.n_users)
    return ranks.numpy(), metrics, protocol


def _ranks(users: torch.Tensor, items: torch.Tensor, targets: Any, cfg: KarmaConfig) -> torch.Tensor:
    return rank_targets(
        users, items, targets.items, targets.exclude_offsets, targets.exclude_items, batch_size=cfg.eval.batch_size
    )


def execute_run(config: KarmaConfig, diagnose_users: int, export: bool, progress: bool = True) -> dict[str, Any]:
    """Train (or resume, or reuse) one run and return its `study_run.json` payload."""
    from training.checkpoint import read_checkpoint_info
    from training.plots import plot_training_curves
    from training.setup import build_setup
    from training.trainer import CHECKPOINT_DIR, METRICS_LOG, run_dir, train

    run = run_dir(config)
    current = signature(config)
    done = run / RUN_RESULT
    if (result := finished_record(done, current)) is not None:
        return result
    _claim(run, current)

    checkpoint = run / CHECKPOINT_DIR
    state = checkpoint / "trainer_state.json"
    first_step = json.loads(state.read_text())["step"] if state.exists() else 0
    started, cpu_started = time.perf_counter(), time.process_time()
    train_result = train(config, resume=True, progress=progress, evaluate_at_end=False)
    timing = {  # one line per invocation (a resumed run sums them; a killed one leaves no line)
        "steps": config.train.semantic_warmup_steps + config.train.steps - first_step,
        "train_wall_s": time.perf_counter() - started,
        "train_cpu_s": time.process_time() - cpu_started,  # not counting time paused (SIGSTOP) or waiting
        "train_seconds": train_result["train_seconds"],
        "train_loop_cpu_s": train_result["train_cpu_seconds"],  # the training loop only (no setup, no validation)
        "targets": train_result["targets"],
    }
    with (run / RUN_WALL_LOG).open("a") as fh:
        fh.write(json.dumps(timing) + "\n")
    plot_training_curves(run / METRICS_LOG, run / "training_curves.png")

    info = read_checkpoint_info(checkpoint)
    setup = build_setup(config, checkpoint=checkpoint, progress=False)
    t0 = time.perf_counter()
    _, metrics, protocol = evaluate_ranks(setup)
    eval_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    diagnostics = _diagnose(setup, checkpoint, diagnose_users)
    diagnose_seconds = time.perf_counter() - t0
    served_parameters = sum(p.numel() for p in setup.model.query_tower.parameters()) + sum(
        p.numel() for p in setup.model.item_tower.parameters()
    )
    all_parameters = sum(p.numel() for p in setup.model.parameters())
    del setup

    export_summary = _export(checkpoint, run / BUNDLE_DIR) if export else None
    walls = [json.loads(line) for line in (run / RUN_WALL_LOG).read_text().splitlines() if line.strip()]
    total_steps = config.train.semantic_warmup_steps + config.train.steps
    result = {
        "run": config.train.run_name,
        "preset": config.loss.preset,
        "seed": config.seed,
        "signature": current,
        "steps": {"semantic_warmup": config.train.semantic_warmup_steps, "action": config.train.steps},
        "trained_step": info.state.get("step"),
        "protocol": protocol,
        "metrics": metrics,
        "diagnostics": diagnostics,
        "parameters": {"served": served_parameters, "train_only": all_parameters - served_parameters},
        "seconds": {
            "train": sum(w["train_seconds"] for w in walls),
            "train_wall": sum(w["train_wall_s"] for w in walls),
            "invocations": len(walls),
            # CPU seconds per optimizer step over the invocations that logged both (None for runs
            # recorded before CPU time was logged): immune to the job being paused or preempted.
            "train_cpu_per_step": _cpu_per_step(walls),
            # CPU seconds of the training loops (what SASRec's equal-CPU budget is matched to); None
            # for runs recorded before it was logged.
            "train_cpu": logged_total(walls, "train_loop_cpu_s", total_steps),
            "targets": logged_total(walls, "targets", total_steps),
            "evaluate": eval_seconds,
            "diagnose": diagnose_seconds,
            "export": export_summary["seconds"] if export_summary else 0.0,
        },
        "export": export_summary,
        "machine": machine(),
        "threads": config.train.threads,
    }
    write_json(done, result)
    return result


def _diagnose(setup: Any, checkpoint: Path, n_users: int) -> dict[str, Any]:
    """Collapse diagnostics of a run: the full JSON (maps included) beside it, the summary returned."""
    from training.diagnostics import diagnose_setup

    diagnostics = diagnose_setup(setup, checkpoint, n_users=n_users)
    diagnostics.name = setup.config.train.run_name
    write_json(checkpoint.parent / DIAGNOSTICS_FILE, diagnostics.to_json())
    return {"summary": diagnostics.summary(), "reference": diagnostics.reference_summary()}


def refresh_diagnostics(config: KarmaConfig, diagnose_users: int) -> None:
    """Recompute a finished run's diagnostics with the current code (new metrics), without retraining."""
    from training.setup import build_setup
    from training.trainer import CHECKPOINT_DIR, run_dir

    run = run_dir(config)
    result = json.loads((run / RUN_RESULT).read_text())
    setup = build_setup(config, checkpoint=run / CHECKPOINT_DIR, progress=False)
    t0 = time.perf_counter()
    result["diagnostics"] = _diagnose(setup, run / CHECKPOINT_DIR, diagnose_users)
    result["seconds"]["diagnose"] = time.perf_counter() - t0
    write_json(run / RUN_RESULT, result)


def logged_total(walls: list[dict[str, Any]], key: str, total_steps: int) -> float | None:
    """Sum of `key` over the logged invocations, scaled up to `total_steps` when some steps were
    trained by an invocation that was killed (it logs nothing): exact for a run never interrupted,
    an estimate at the logged invocations' rate otherwise. None when an invocation predates `key`."""
    if not walls or not all(key in w for w in walls):
        return None
    logged = sum(w["steps"] for w in walls)
    return sum(w[key] for w in walls) * (total_steps / logged if 0 < logged < total_steps else 1.0)


def _cpu_per_step(walls: list[dict[str, Any]]) -> float | None:
    timed = [w for w in walls if "train_cpu_s" in w and w.get("steps")]
    return sum(w["train_cpu_s"] for w in timed) / sum(w["steps"] for w in timed) if timed else None


def _export(checkpoint: Path, bundle: Path) -> dict[str, Any]:
    from export.bundle_writer import export_checkpoint

    t0 = time.perf_counter()
    result = export_checkpoint(checkpoint, bundle, force=True, text_encoder=False)  # evaluated, never served live
    m = result.manifest
    return {
        "bundle": str(bundle),
        "model_version": m.model_version,
        "parity_max_abs_diff": {k: m.parity[k]["max_abs_diff"] for k in ("query", "item")},
        "served_parameters": m.served_parameters,
        "dropped": {d.module: d.parameters for d in m.dropped},
        "cost": m.cost,
        "seconds": time.perf_counter() - t0,
    }


def execute_baseline(
    name: str,
    config: KarmaConfig,
    out_dir: Path,
    sasrec: dict[str, Any],
    seed: int,
    progress: bool = True,
    label: str | None = None,
) -> dict[str, Any]:
    """Train/evaluate one reference model on the study's data and protocol; cached like a run.

    `label` names its files when one baseline runs twice with other settings (SASRec converged and
    SASRec under a training-CPU budget: `sasrec-cpu`).
    """
    from training.baselines import baseline_embeddings, sasrec_item_embeddings, sasrec_user_embeddings, train_sasrec
    from training.baselines.sasrec import SASRecConfig
    from training.data.registry import load_dataset
    from training.data.split import split_dataset
    from training.setup import pick_device

    label = label or name
    current = baseline_signature(config, name, sasrec)
    done = out_dir / f"{label}.json"
    if (result := finished_record(done, current)) is not None:
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dataset = load_dataset(config, progress=progress)
    split = split_dataset(dataset, config.data.min_history, config.data.max_history)
    ev = config.eval
    targets = eval_targets(split, "test", ev.exclude_history, ev.max_users)
    sasrec_cfg = SASRecConfig(**{"seed": seed, **sasrec})
    device = pick_device(config.train.device)  # SASRec trains where the study's runs do
    training: dict[str, Any] = {}
    if name == "sasrec":
        model = train_sasrec(dataset, split, sasrec_cfg, device=device, progress=progress)
        users, items = sasrec_user_embeddings(model, dataset, split, targets.positions), sasrec_item_embeddings(model)
        log_ = model.train_log  # type: ignore[attr-defined]
        training = {
            "train_cpu": log_[-1]["train_cpu_seconds"] if log_ else 0.0,  # validation not counted
            "epochs": len(log_),
            "best_epoch": model.best_epoch,  # type: ignore[attr-defined]
        }
    else:
        users, items = baseline_embeddings(name, dataset, split, config, targets, sasrec_cfg, device, progress)
    ranks = _ranks(users, items, targets, config)
    buckets = split_buckets(split, len(dataset.catalog.items), dataset.catalog.cold)
    save_ranks(out_dir / f"{label}_{RANKS_FILE}", ranks, targets, dataset.catalog.cold, buckets)
    window = sasrec_cfg.max_len if name == "sasrec" else True
    protocol = protocol_for(config, dataset, "test", targets.n_users, model_input=window)
    result = {
        "baseline": name,
        "label": label,
        "signature": current,
        "protocol": protocol,
        "metrics": segment_metrics(ranks, targets.items, dataset.catalog.cold, ev.ks, buckets),
        "settings": _settings(name, config, sasrec_cfg),
        "training": training,
        "seconds": time.perf_counter() - t0,
        "machine": machine(),
    }
    write_json(done, result)
    return result


def sasrec_cpu_settings(study: StudyConfig, extra: Sequence[str] = ()) -> dict[str, Any] | None:
    """SASRec's settings under the CPU budget of `sasrec_cpu_match`'s first-seed run (None until that run is done)."""
    if study.sasrec_cpu_match is None:
        return None
    from training.trainer import run_dir

    config = study.run_config(study.sasrec_cpu_match, study.seeds[0], extra)
    record = finished_record(run_dir(config) / RUN_RESULT, signature(config))
    cpu = (record or {}).get("seconds", {}).get("train_cpu")
    if cpu is None:
        return None
    return {**study.sasrec, "max_cpu_seconds": round(float(cpu), 1)}


def _settings(name: str, config: KarmaConfig, sasrec_cfg: Any) -> dict[str, Any]:
    if name == "sasrec":
        return dict(sasrec_cfg.__dict__)
    if name == "content":
        return {"text_block": _text_block(config)}
    return {}


def _text_block(config: KarmaConfig) -> str:
    """Name of the text feature block the content baseline reads (e.g. text:minilm-l6-v2)."""
    from training.features.text import make_text_encoder

    return make_text_encoder(config.features, progress=False).name  # lazy: no model is loaded
