"""Adopt finished runs from a published `results.json` when their artifacts are gone.

A study's artifacts folder (checkpoints, ranks, logs) is not in git; its report is. When a fresh
checkout has only the report, `karma study --adopt docs/results/NAME/results.json` writes each
recorded run's `study_run.json` back (the numbers, diagnostics summary, timings and machine exactly
as recorded, plus an `adopted` stamp) so the study trains only what is still missing instead of
starting over. A record is adopted only when its signature equals the run the study file would
train now; anything else is refused by name. Adopted runs have no ranks, training log or attention
maps on disk, so the figures draw from the runs that do and the report lists which were adopted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from karma.errors import KarmaError
from recipes.study.config import REFERENCE_PRESET, SASREC_CPU, StudyConfig
from recipes.study.runs import (
    ADOPTED_KEY,
    RUN_RESULT,
    baseline_signature,
    finished_record,
    same_signature,
    sasrec_cpu_settings,
    signature,
    signature_differences,
    write_json,
)
from training.trainer import run_dir

log = logging.getLogger(__name__)


def adopt_results(study: StudyConfig, source: Path, extra: Sequence[str] = ()) -> dict[str, list[str]]:
    """Write back every run, the warm-up reference and baselines recorded in `source` that are not on disk.

    Returns {"adopted": names, "kept": names already finished here, "refused": "name: why"}.
    """
    try:
        published = json.loads(Path(source).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KarmaError(f"--adopt {source}: cannot read a results.json ({exc})") from None
    if published.get("study", {}).get("name") != study.name:
        raise KarmaError(
            f"--adopt {source}: holds study {published.get('study', {}).get('name')!r}, not {study.name!r}"
        )
    stamp = {"from": str(source), "generated": published.get("generated")}
    outcome: dict[str, list[str]] = {"adopted": [], "kept": [], "refused": []}

    configs = {study.run_name(p, s): study.run_config(p, s, extra) for p, s in study.plan()}
    if study.warmup_reference:
        configs[study.reference_run_name] = study.reference_config(extra)
    records = dict(published.get("runs", {}))
    if published.get("warmup_reference"):
        records[study.reference_run_name] = published["warmup_reference"]
    for name, record in records.items():
        config = configs.get(name)
        if config is None:
            outcome["refused"].append(f"{name}: not in this study's plan")
            continue
        _adopt_one(name, record, signature(config), run_dir(config) / RUN_RESULT, stamp, outcome)

    base = study.run_config(REFERENCE_PRESET, study.seeds[0], extra)
    cpu_settings = sasrec_cpu_settings(study, extra)  # from the runs adopted above
    for name, record in published.get("baselines", {}).items():
        if name == SASREC_CPU and study.sasrec_cpu_match is not None:
            # The budget comes from the matched run; without it here, check the rest against the record's budget.
            recorded = {**study.sasrec, "max_cpu_seconds": record.get("settings", {}).get("max_cpu_seconds")}
            current = baseline_signature(base, "sasrec", cpu_settings or recorded)
        elif name in study.baselines:
            current = baseline_signature(base, name, study.sasrec)
        else:
            outcome["refused"].append(f"baseline {name}: not in this study")
            continue
        target = study.artifacts_dir / "baselines" / f"{name}.json"
        _adopt_one(f"baseline {name}", record, current, target, stamp, outcome)
    for key, names in outcome.items():
        if names:
            log.info("study %s: %s %s", study.name, key, ", ".join(names))
    return outcome


def _adopt_one(
    name: str,
    record: Mapping[str, Any],
    current: Mapping[str, Any],
    target: Path,
    stamp: Mapping[str, Any],
    outcome: dict[str, list[str]],
) -> None:
    if finished_record(target, current) is not None:
        outcome["kept"].append(name)
        return
    stored = record.get("signature")
    if not same_signature(stored, current):
        why = "; ".join(signature_differences(stored, current)[:3]) if stored else "no signature recorded"
        outcome["refused"].append(f"{name}: recorded with another configuration ({why})")
        return
    write_json(target, {**record, ADOPTED_KEY: dict(record.get(ADOPTED_KEY) or stamp)})
    outcome["adopted"].append(name)
