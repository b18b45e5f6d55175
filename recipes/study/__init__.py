"""`karma study`: train every preset with the same backbone, data, budget and seeds; report them side by side.

    karma study --config studies/ml-1m.yaml            # train what is missing, then write the report
    karma study --config studies/ml-1m.yaml --report-only

Layout: runs, caches and bundles under the study's artifacts folder (`artifacts/studies/<name>`);
`RESULTS.md`, `results.json` and the PNG figures under its report folder (`docs/results/<name>`).
See `recipes.study.config` for the study file, `recipes.study.runs` for one run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from karma.errors import KarmaError
from recipes.study.aggregate import METRIC_KEYS, paired_deltas, preset_table
from recipes.study.config import REFERENCE_PRESET, SASREC_CPU, StudyConfig, load_study
from recipes.study.figures import (
    CURVES_FIGURE,
    DELTAS_FIGURE,
    HR_FIGURE,
    plot_deltas,
    plot_diagnostics,
    plot_hr_at_k,
    plot_training_curves,
)
from recipes.study.intervals import (
    ARCHIVE,
    INTERVAL_RULE,
    Bootstrap,
    RankRuns,
    against_one,
    model_intervals,
    paired_intervals,
    update_archive,
)
from recipes.study.report import baseline_label, render
from recipes.study.runs import (
    BUNDLE_DIR,
    DIAGNOSTICS_FILE,
    RANKS_FILE,
    RUN_RESULT,
    baseline_signature,
    execute_baseline,
    execute_run,
    finished_record,
    refresh_diagnostics,
    sasrec_cpu_settings,
    signature,
    write_json,
)
from training.trainer import CHECKPOINT_DIR, run_dir

__all__ = ["StudyConfig", "build_report", "load_study", "rediagnose", "run_study"]

log = logging.getLogger(__name__)

RESULTS_MD = "RESULTS.md"
RESULTS_JSON = "results.json"
COMPARE_FILE = "compare.json"
MAP_PRESETS = ("action-only", "recon", "karma")  # drawn side by side in the attention-map figure
REDRAW_AFTER_S = 60.0
DELTA_METRIC = "HR@200"  # the paper's headline metric: the forest plot's


def run_study(
    study: StudyConfig,
    extra: Sequence[str] = (),
    report_only: bool = False,
    max_runs: int | None = None,
    progress: bool = True,
    command: str | None = None,
    figures: bool = True,
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run what is missing (at most `max_runs` new runs), regenerating the report after each run.

    `only` restricts training to the named runs (e.g. `karma-s2`, `warmup-only-s0`, `sasrec`), so
    two processes can share one study's plan on two cores; the report still covers every run.

    Figures are redrawn after a run only when it took over `REDRAW_AFTER_S` (drawing them costs
    seconds, a real run minutes), and always at the end unless `figures` is False.
    """
    command = command or _command(study, extra)
    if only is not None:
        known = {study.run_name(p, s) for p, s in study.plan()} | {study.reference_run_name, *study.baselines}
        known |= {SASREC_CPU} if study.sasrec_cpu_match else set()
        unknown = sorted(set(only) - known)
        if unknown:
            raise KarmaError(
                f"--runs: {', '.join(unknown)} not in study {study.name} (runs: {', '.join(sorted(known))})"
            )
    wanted = (lambda name: True) if only is None else set(only).__contains__
    if not report_only:
        base = study.run_config(REFERENCE_PRESET, study.seeds[0], extra)
        baseline_dir = study.artifacts_dir / "baselines"
        for name in [b for b in study.baselines if b != "sasrec"]:  # seconds: before any training
            execute_baseline(name, base, baseline_dir, study.sasrec, study.seeds[0], progress)
        if study.warmup_reference and wanted(
            study.reference_run_name
        ):  # minutes: the "before" picture of the diagnostics
            log.info("study %s: warm-up reference run %s", study.name, study.reference_run_name)
            execute_run(study.reference_config(extra), study.diagnose_users, export=False, progress=progress)
        plan = [(p, s) for p, s in study.plan() if wanted(study.run_name(p, s))]
        fresh = 0
        for i, (preset, seed) in enumerate(plan, start=1):
            config = study.run_config(preset, seed, extra)
            if not _finished(run_dir(config), config):
                if max_runs is not None and fresh >= max_runs:
                    log.info("study %s: stopping after %d new run(s) (--max-runs)", study.name, fresh)
                    break
                fresh += 1
            log.info("study %s: run %d/%d: %s", study.name, i, len(plan), study.run_name(preset, seed))
            started = time.perf_counter()
            execute_run(config, study.diagnose_users, study.export, progress)
            build_report(study, extra, command, figures=time.perf_counter() - started > REDRAW_AFTER_S)
        else:
            if "sasrec" in study.baselines and wanted("sasrec"):
                execute_baseline("sasrec", base, baseline_dir, study.sasrec, study.seeds[0], progress)
            settings = sasrec_cpu_settings(study, extra)
            if settings is not None and wanted(SASREC_CPU):
                execute_baseline("sasrec", base, baseline_dir, settings, study.seeds[0], progress, label=SASREC_CPU)
    return build_report(study, extra, command, figures=figures)


def rediagnose(study: StudyConfig, extra: Sequence[str] = ()) -> list[str]:
    """Recompute the diagnostics of every finished run (warm-up reference included) with the current
    code, e.g. after a metric was added; nothing is retrained. Returns the runs it refreshed."""
    configs = [study.reference_config(extra)] if study.warmup_reference else []
    configs += [study.run_config(preset, seed, extra) for preset, seed in study.plan()]
    done = []
    for config in configs:
        if _finished(run_dir(config), config):
            if not (run_dir(config) / CHECKPOINT_DIR).exists():  # adopted from a report: numbers only
                log.info("study %s: %s has no checkpoint here (adopted); kept", study.name, config.train.run_name)
                continue
            log.info("study %s: re-diagnosing %s", study.name, config.train.run_name)
            refresh_diagnostics(config, study.diagnose_users)
            done.append(config.train.run_name)
    return done


def _command(study: StudyConfig, extra: Sequence[str]) -> str:
    sets = "".join(f" --set {item}" for item in extra)
    return f"karma study --config studies/{study.name}.yaml{sets}"


def _finished(run: Path, config: Any) -> bool:
    return finished_record(run / RUN_RESULT, signature(config)) is not None


def _load_runs(study: StudyConfig, extra: Sequence[str]) -> tuple[dict[str, Any], dict[str, Path], list[str]]:
    """Finished runs (name -> study_run.json), their folders, and the names still missing, in plan order."""
    from training.trainer import run_dir

    runs: dict[str, Any] = {}
    folders: dict[str, Path] = {}
    missing: list[str] = []
    for preset, seed in study.plan():
        config = study.run_config(preset, seed, extra)
        name = study.run_name(preset, seed)
        if _finished(run_dir(config), config):
            runs[name] = json.loads((run_dir(config) / RUN_RESULT).read_text())
            folders[name] = run_dir(config)
        else:
            missing.append(name)
    return runs, folders, missing


def _load_baselines(study: StudyConfig, extra: Sequence[str]) -> dict[str, Any]:
    base = study.run_config(REFERENCE_PRESET, study.seeds[0], extra)
    wanted = [(name, name, study.sasrec) for name in study.baselines]
    if (settings := sasrec_cpu_settings(study, extra)) is not None:
        wanted.append((SASREC_CPU, "sasrec", settings))
    out = {}
    for label, name, settings in wanted:
        path = study.artifacts_dir / "baselines" / f"{label}.json"
        if (result := finished_record(path, baseline_signature(base, name, settings))) is not None:
            out[label] = result
    return out


def build_report(
    study: StudyConfig, extra: Sequence[str] = (), command: str | None = None, figures: bool = True
) -> dict[str, Any]:
    """Aggregate whatever has finished into results.json, RESULTS.md and (unless `figures` is False) the figures.

    Without `figures`, the PNGs already in the report folder are kept and still linked.
    """
    from training.model.karma import PRESETS

    out_dir = study.report_path
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, folders, missing = _load_runs(study, extra)
    baselines = _load_baselines(study, extra)
    by_preset: dict[str, list[dict[str, Any]]] = {}
    for result in runs.values():
        by_preset.setdefault(result["preset"], []).append(result)
    base = study.run_config(REFERENCE_PRESET, study.seeds[0], extra)
    reference = _load_reference(study, extra)
    protocol = next(iter(runs.values()))["protocol"] if runs else next(iter(baselines.values()), {}).get("protocol", "")
    previous = out_dir / RESULTS_JSON
    drawn = json.loads(previous.read_text()).get("figures", {}) if previous.exists() else {}
    intervals = _intervals(study, runs, folders, baselines)
    if figures:  # a figure with nothing on disk to draw from (adopted runs only) keeps its last PNG
        drawn.update(_draw_figures(study, runs, folders, baselines, protocol, reference))
        title = f"{study.title or study.name}: paired Δ{DELTA_METRIC} against action-only, test split"
        if plot_deltas(intervals.get("deltas") or {}, out_dir / DELTAS_FIGURE, DELTA_METRIC, title):
            drawn[DELTAS_FIGURE] = {"metric": DELTA_METRIC}
    results = {
        "study": study.model_dump(mode="json"),
        "command": command or _command(study, extra),
        "extra_overrides": list(extra),
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "status": {"planned": len(study.plan()), "finished": len(runs), "missing": missing},
        "protocol": protocol,
        "setup": _setup_text(base, runs, {p: PRESETS[p] for p in study.presets}),
        "runs": runs,
        "warmup_reference": reference[0] if reference else None,
        "presets": {p: preset_table(by_preset[p]) for p in study.presets if p in by_preset},
        "baselines": baselines,
        "deltas": paired_deltas(by_preset),
        "intervals": intervals,
        "diagnostics_reference": next(iter(runs.values()))["diagnostics"]["reference"] if runs else {},
        "compare": _compare(study, folders),
        "figures": drawn,
    }
    write_json(out_dir / RESULTS_JSON, results)
    (out_dir / RESULTS_MD).write_text(render(study, json.loads((out_dir / RESULTS_JSON).read_text())))
    log.info("study %s: %d/%d runs finished; report in %s", study.name, len(runs), len(study.plan()), out_dir)
    return results


def _intervals(
    study: StudyConfig, runs: dict[str, Any], folders: dict[str, Path], baselines: dict[str, Any]
) -> dict[str, Any]:
    """Bootstrap intervals of every model and paired deltas vs action-only (and vs SASRec at equal CPU).

    Ranks come from the runs' folders, merged into the report's archive (`ranks.npz`), so a checkout
    without the artifacts regenerates the same intervals.
    """
    files: dict[str, dict[int, Path]] = {}
    for name, folder in folders.items():
        if (folder / RANKS_FILE).exists():
            files.setdefault(runs[name]["preset"], {})[runs[name]["seed"]] = folder / RANKS_FILE
    for label in baselines:
        path = study.artifacts_dir / "baselines" / f"{label}_{RANKS_FILE}"
        if path.exists():
            files[label] = {study.seeds[0]: path}
    archived = update_archive(study.report_path / ARCHIVE, files)
    finished = {}  # only what this report's tables hold (an archive may keep a model since dropped)
    for preset in study.presets:
        seeds = sorted(r["seed"] for r in runs.values() if r["preset"] == preset)
        if preset in archived and seeds and set(seeds) <= set(archived[preset].seeds):
            finished[preset] = _subset(archived[preset], seeds)
    finished.update({label: archived[label] for label in baselines if label in archived})
    if not finished:
        return {}
    boot = Bootstrap(len(next(iter(finished.values())).ranks[0]))
    out: dict[str, Any] = {
        "rule": INTERVAL_RULE,
        "models": {m: model_intervals(boot, r, METRIC_KEYS) for m, r in finished.items()},
        "deltas": {},
        "vs_sasrec_cpu": {},
    }
    if (reference := finished.get(REFERENCE_PRESET)) is not None:
        for preset in study.presets:
            if preset != REFERENCE_PRESET and preset in finished:
                out["deltas"][preset] = paired_intervals(boot, finished[preset], reference, METRIC_KEYS)
    if SASREC_CPU in finished:
        for preset in study.headline:
            if preset in finished:
                out["vs_sasrec_cpu"][preset] = against_one(boot, finished[preset], finished[SASREC_CPU], METRIC_KEYS)
    return out


def _subset(runs: RankRuns, seeds: Sequence[int]) -> RankRuns:
    rows = [runs.seeds.index(s) for s in seeds]
    return RankRuns(tuple(seeds), runs.ranks[rows], runs.masks)


def _load_reference(study: StudyConfig, extra: Sequence[str]) -> tuple[dict[str, Any], Path] | None:
    """The warm-up reference run (result, folder) if the study has one and it finished."""
    if not study.warmup_reference:
        return None
    config = study.reference_config(extra)
    if not _finished(run_dir(config), config):
        return None
    return json.loads((run_dir(config) / RUN_RESULT).read_text()), run_dir(config)


def _draw_figures(
    study: StudyConfig,
    runs: dict[str, Any],
    folders: dict[str, Path],
    baselines: dict[str, Any],
    protocol: str,
    reference: tuple[dict[str, Any], Path] | None,
) -> dict[str, Any]:
    """HR@K curves (every run and baseline), then first-seed training curves, sink metrics and maps."""
    from training.diagnostics import ModelDiagnostics
    from training.trainer import METRICS_LOG

    out_dir = study.report_path
    drawn: dict[str, Any] = {}
    model_ranks: dict[str, list[np.ndarray]] = {}
    cold_masks: dict[str, np.ndarray] = {}
    sources = [(runs[name]["preset"], folder / RANKS_FILE) for name, folder in folders.items()]
    sources += [
        (f"({baseline_label(name, b)})", study.artifacts_dir / "baselines" / f"{name}_{RANKS_FILE}")
        for name, b in baselines.items()
    ]
    for label, path in sources:
        if not path.exists():  # an adopted run: its numbers are in the table, its ranks are not here
            continue
        data = np.load(path)
        model_ranks.setdefault(label, []).append(data["ranks"])
        if "cold" in data:
            cold_masks[label] = data["cold"]
    if model_ranks:
        plot_hr_at_k(model_ranks, cold_masks or None, study.hr_curve_max_k, out_dir / HR_FIGURE, protocol)
        drawn[HR_FIGURE] = {"models": list(model_ranks)}
    first = {}  # per preset, its first seed whose artifacts are here (adopted runs have none)
    for p in study.presets:
        names = [study.run_name(p, s) for s in study.seeds_of(p)]
        here = [n for n in names if n in folders and (folders[n] / DIAGNOSTICS_FILE).exists()]
        if here:
            first[p] = here[0]
    logs = {p: folders[name] / METRICS_LOG for p, name in first.items()}
    if logs and plot_training_curves(logs, out_dir / CURVES_FIGURE):
        drawn[CURVES_FIGURE] = {"runs": list(first.values())}
    if reference and not (reference[1] / DIAGNOSTICS_FILE).exists():
        reference = None
    diagnosed = ([reference[1]] if reference else []) + [folders[name] for name in first.values()]
    diagnostics = [ModelDiagnostics.from_json(json.loads((f / DIAGNOSTICS_FILE).read_text())) for f in diagnosed]
    if reference:
        diagnostics[0].name = f"{study.reference_run_name} (before the action stage)"
    maps = [d for d in diagnostics if d.preset in MAP_PRESETS]  # the reference is action-only too: drawn first
    drawn.update(plot_diagnostics(diagnostics, maps, out_dir))
    return drawn


def _setup_text(config: Any, runs: dict[str, Any], presets: dict[str, Any]) -> dict[str, str]:
    m, t, loss = config.model, config.train, config.loss
    layers = f"first {m.num_layers} layers" if m.num_layers else "all layers"
    model = (
        f"backbone `{m.backbone}` ({layers}), D = {m.embed_dim}, newest {config.data.max_history} history items, "
        f"text features `{config.features.text_encoder}`, item IDs `{config.features.item_ids}`, "
        f"batch {t.batch_size} × {t.grad_accum} windows, targets `{t.targets}` position(s) per window, "
        f"{t.semantic_warmup_steps} semantic warm-up + {t.steps} action steps, AdamW lr {t.lr_backbone:g} "
        f"(backbone) / {t.lr_heads:g} (rest), L_act = {loss.act} with negatives `{loss.negatives}` (sampled: "
        f"{loss.sampled_negatives} popularity-sampled + in-batch{', logQ' if loss.logq_correction else ''}), "
        f"temperature {loss.temperature:g}{' (learned)' if loss.learn_temperature else ''}, "
        f"regularizers on {loss.reg_positions} position(s) per window, "
        f"LM softmax over the {loss.lm_vocab} vocabulary, {t.threads} torch thread(s), device {t.device}"
    )
    by_machine: dict[str, list[str]] = {}  # a resumed or adopted study may span machines: say which ran what
    for name, run in runs.items():
        by_machine.setdefault(_machine_text(run.get("machine") or {}), []).append(name)
    if len(by_machine) > 1:
        machine_text = "; ".join(f"{text} ({', '.join(names)})" for text, names in by_machine.items())
    else:
        machine_text = next(iter(by_machine), "(no run yet)")
    preset_text = "; ".join(f"`{p}` {w[:3]} {w[3]}" for p, w in presets.items())
    return {"model": model, "machine": machine_text, "presets": preset_text}


def _machine_text(machine: dict[str, Any]) -> str:
    return (
        f"{machine.get('cpu')}, {machine.get('cores')} cores"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU")
        + f", torch {machine.get('torch') or machine.get('versions', {}).get('torch')}, Python {machine.get('python')}"
    )


def _compare(study: StudyConfig, folders: dict[str, Path]) -> dict[str, Any] | None:
    """`karma compare` of the first seed's action-only and karma (or recon) bundles, cached by model version."""
    if not study.export:
        return None
    a = study.run_name(REFERENCE_PRESET, study.seeds[0])
    others = [p for p in ("karma", "karma-text", "recon", *study.presets) if p != REFERENCE_PRESET]
    b = next((study.run_name(p, study.seeds[0]) for p in others if study.run_name(p, study.seeds[0]) in folders), None)
    if a not in folders or b is None:
        return None
    from export.compare import compare_bundles
    from karma.bundle import read_manifest

    bundle_a, bundle_b = folders[a] / BUNDLE_DIR, folders[b] / BUNDLE_DIR
    if not (bundle_a / "manifest.json").exists() or not (bundle_b / "manifest.json").exists():
        return None
    key = [read_manifest(bundle_a).model_version, read_manifest(bundle_b).model_version, study.compare_requests]
    cache = study.artifacts_dir / COMPARE_FILE
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached
    report = compare_bundles(bundle_a, bundle_b, requests=study.compare_requests)
    report["a"]["run"], report["b"]["run"] = a, b
    report["key"] = key
    write_json(cache, report)
    return report
