"""RESULTS.md of a study: tables of every preset and baseline, deltas, diagnostics, cost, figures.

The Markdown is generated from `results.json` (written beside it) and regenerated after every
finished run, so a half-finished study already reports what it has, and says what is missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from recipes.study.aggregate import METRIC_KEYS
from recipes.study.config import REFERENCE_PRESET, SASREC_CPU, StudyConfig
from recipes.study.figures import CURVES_FIGURE, DELTAS_FIGURE, HR_FIGURE, LAYERS_FIGURE, MAPS_FIGURE
from recipes.study.runs import ADOPTED_KEY
from training.diagnostics import METRIC_LABELS
from training.evaluation.popularity import BUCKET_RULE
from training.evaluation.report import SEGMENTS

PAPER = (
    "The paper (KARMA, arXiv 2603.22779, Taobao) reports, against action-only training, +19.19 HR@200 from "
    "embedding-conditioned reconstruction alone (our `recon`) and +22.57 HR@200 with history-conditioned "
    "generation too (our `karma-text`; our `karma` adds the flow-matching L_img), as quoted in DESIGN.md, "
    "which does not say whether these are points or percent; both are given below."
)
BASELINE_LABELS = {
    "popular": "most-popular",
    "content": "frozen content",
    "sasrec": "SASRec",
    SASREC_CPU: "SASRec at equal training CPU",
}


def baseline_label(name: str, result: Mapping[str, Any] | None = None) -> str:
    """'most-popular', 'SASRec', 'frozen content (text:minilm-l6-v2)'."""
    label = BASELINE_LABELS.get(name, name)
    block = (result or {}).get("settings", {}).get("text_block")
    return f"{label} ({block})" if block else label


DIAG_ROWS = (
    "emb_first_token_mass · last layer",
    "rows_first_token_mass · mean over layers",
    "emb_top_column_mass · last layer",
    "rows_top_column_mass · mean over layers",
    "row_consistency · mean over layers",
    "row_consistency · last layer",
    "emb_entropy · last layer",
    "effective_rank",
    "h_mean_cosine",
    "hr@200_own_h",
    "hr@200_shared_h",
    "recon_token_accuracy",
    "category_jaccard@50",
)


def fmt(stat: Mapping[str, Any] | None, digits: int = 4, scale: float = 1.0) -> str:
    """'0.1234 ± 0.0012' (n > 1), '0.1234' (n = 1), '—' (none)."""
    if not stat or stat.get("mean") is None:
        return "—"
    mean = stat["mean"] * scale
    if stat.get("std") is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: Sequence[str], align: str = "---:") -> list[str]:
    return [_row(cells), _row([":---", *([align] * (len(cells) - 1))])]


def render(study: StudyConfig, results: Mapping[str, Any]) -> str:
    presets: dict[str, Any] = results["presets"]
    baselines: dict[str, Any] = results["baselines"]
    lines = [f"# Study `{study.name}`: {study.title or 'KARMA presets vs action-only'}", ""]
    lines += [
        f"Regenerate with `{results['command']}` (finished runs are reused, an interrupted one resumes from its "
        f"checkpoint). Generated {results['generated']} from `results.json` in this folder, which holds every "
        "number below and the per-seed values.",
        "",
    ]
    status = results["status"]
    lines.append(
        f"**Status:** {status['finished']} of {status['planned']} runs finished"
        + (f"; still to run: {', '.join(status['missing'])}." if status["missing"] else ".")
    )
    adopted = adopted_runs(results)
    if adopted:
        stamps = [r[ADOPTED_KEY] for r in _adopted(results)]
        sources = sorted({f"{stamp['from']} ({stamp['generated']})" for stamp in stamps})
        lines += [
            "",
            f"**Adopted runs:** {', '.join(adopted)} were trained, evaluated and diagnosed by an earlier invocation "
            f"of the same command on the same configuration (signature checked) and adopted from {'; '.join(sources)} "
            "with `karma study --adopt` after their artifacts were lost: their numbers are in every table, but the "
            "figures draw only from runs whose ranks, logs and attention maps are on disk.",
        ]
    lines += ["", "## Setup", ""]
    setup = results["setup"]
    others = ", ".join(p for p in study.presets if p not in study.headline) or "no other preset"
    lines += [
        f"- **Protocol:** {results['protocol']}.",
        f"- **Model and budget (every run):** {setup['model']}.",
        f"- **Seeds:** {', '.join(study.headline)} × seeds {study.seeds}; "
        f"{others} × seed {study.seeds[0]}. "
        "A seed fixes the towers' and heads' initialisation, the batch order, the sampled negatives and the "
        "flow noise; the pretrained backbone weights are the same for every run.",
        f"- **Loss weights per preset (λ_gen, λ_recon, λ_img, visual head):** {setup['presets']}.",
        f"- **Machine:** {setup['machine']}.",
        f"- **Overrides shared by every run:** `{' '.join(study.overrides) or '(none)'}`"
        + (f"; from the command line: `{' '.join(results['extra_overrides'])}`" if results["extra_overrides"] else "")
        + ".",
        "",
    ]
    intervals = results.get("intervals") or {}
    if intervals.get("models"):
        lines += _interval_tables(study, presets, baselines, intervals)
    else:  # a report from before per-user intervals: seed spread only
        lines += _quality_table(study, presets, baselines)
        if any("cold" in p["metrics"] for p in presets.values()):
            lines += _warm_cold_table(study, presets, baselines)
    if intervals.get("deltas"):
        lines += _interval_delta_table(study, intervals)
    if intervals.get("vs_sasrec_cpu"):
        lines += _sasrec_cpu_table(study, presets, baselines, intervals)
    lines += _delta_table(study, results["deltas"], seed_by_seed=bool(intervals.get("deltas")))
    lines += _diagnostics_table(
        study, presets, results.get("diagnostics_reference") or {}, results.get("warmup_reference")
    )
    lines += _cost_section(results)
    lines += _figures(results)
    lines += _per_run_table(results["runs"])
    return "\n".join(lines) + "\n"


def _ordered(study: StudyConfig, presets: Mapping[str, Any]) -> list[str]:
    return [p for p in study.presets if p in presets]


SEGMENT_TITLES = {
    "all": "all test users",
    "warm": "warm targets (items seen in training)",
    "cold": "cold targets (items never seen in training)",
    "head": "head targets (most-clicked items, first third of training clicks)",
    "torso": "torso targets (next third of training clicks)",
    "tail": "tail targets (the long rest, last third of training clicks and never-clicked warm items)",
}
HEADLINE_KEYS = ("HR@10", "HR@50", "HR@200", "NDCG@10", "NDCG@50", "NDCG@200")
SEGMENT_DELTA = SEGMENTS[1:]  # the delta table's per-segment columns (all = its own columns)


def ci(entry: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 4, signed: bool = False) -> str:
    """'0.7312 [0.7101, 0.7518]' from an interval entry; '—' when empty."""
    if not entry or entry.get("mean") is None:
        return "—"
    sign = "+" if signed else ""
    mean, lo, hi = (entry[k] * scale for k in ("mean", "lo", "hi"))
    return f"{mean:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


def _model_rows(study: StudyConfig, presets: Mapping[str, Any], baselines: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key in intervals, label) of every preset, then every baseline."""
    rows = [(p, f"`{p}`") for p in _ordered(study, presets)]
    return rows + [(name, baseline_label(name, b)) for name, b in baselines.items()]


def _train_cpu(presets: Mapping[str, Any], baselines: Mapping[str, Any], key: str) -> str:
    if key in presets:
        return fmt(presets[key]["seconds"].get("train_cpu"), 0)
    return _num((baselines[key].get("training") or {}).get("train_cpu"), 0)


def _interval_tables(
    study: StudyConfig, presets: Mapping[str, Any], baselines: Mapping[str, Any], intervals: Mapping[str, Any]
) -> list[str]:
    """One table per segment (all, warm/cold, head/torso/tail): every model, six metrics with 95% intervals."""
    models = intervals["models"]
    lines = [
        "## Retrieval quality with 95% intervals (test split, full ranking)",
        "",
        f"Intervals: {intervals['rule']}. Presets with one seed (and every baseline: one run) have intervals over "
        "users only. Popularity buckets: " + BUCKET_RULE + ".",
        "",
    ]
    rows = [(k, label) for k, label in _model_rows(study, presets, baselines) if k in models]
    segments = [seg for seg in SEGMENTS if any(seg in models[k] for k, _ in rows)]
    for seg in segments:
        counts = sorted({models[k][seg]["HR@10"]["users"] for k, _ in rows if seg in models[k]})
        lines += [f"### {SEGMENT_TITLES[seg]} ({'/'.join(map(str, counts))} users)", ""]
        extra = ["train CPU s"] if seg == "all" else []
        lines += _header(["model", "seeds", *HEADLINE_KEYS, *extra])
        for key, label in rows:
            m = models[key].get(seg)
            if m is None:
                continue
            cells = [label, str(m["HR@10"]["seeds"]), *(ci(m[k]) for k in HEADLINE_KEYS)]
            lines.append(_row(cells + ([_train_cpu(presets, baselines, key)] if seg == "all" else [])))
        lines.append("")
    lines += ["Baselines use the same users, targets, exclusions and tie rule; their protocol lines:", ""]
    for name, b in baselines.items():
        extra = f"; SASRec settings: {b['settings']}" if b.get("baseline", name) == "sasrec" else ""
        lines.append(f"- {baseline_label(name, b)} ({b['seconds']:.0f} s wall{extra}): {b['protocol']}")
    return [*lines, ""]


def _interval_delta_table(study: StudyConfig, intervals: Mapping[str, Any]) -> list[str]:
    deltas = intervals["deltas"]
    lines = [f"## Against `{REFERENCE_PRESET}` with 95% intervals (paired by seed and user)", "", PAPER, ""]
    first = next(iter(deltas.values()))
    segments = [seg for seg in SEGMENT_DELTA if seg in first]
    header = ["preset", "seeds", "ΔHR@10", "ΔHR@200", "ΔNDCG@10", "P(Δ ≤ 0), HR@200"]
    lines += _header([*header, *(f"{seg} ΔHR@200" for seg in segments)])
    for preset in _ordered(study, deltas):
        d = deltas[preset]
        cells = [f"`{preset}`", str(len(d["all"]["HR@200"]["paired_seeds"]))]
        cells += [ci(d["all"][k], 100.0, 2, signed=True) for k in ("HR@10", "HR@200", "NDCG@10")]
        cells.append(f"{d['all']['HR@200']['p_le_0']:.3f}")
        cells += [ci(d[seg]["HR@200"], 100.0, 2, signed=True) for seg in segments]
        lines.append(_row(cells))
    lines += [
        "",
        "Δ = preset − action-only in points (×100), mean over the paired seeds and users [95% interval]; "
        f"{intervals['rule']}. P(Δ ≤ 0) is the share of replicates at or below zero (a one-sided bootstrap "
        "p-value for 'the preset is better'). An interval that contains 0 is no evidence of an effect.",
        "",
    ]
    return lines


def _sasrec_cpu_table(
    study: StudyConfig, presets: Mapping[str, Any], baselines: Mapping[str, Any], intervals: Mapping[str, Any]
) -> list[str]:
    sasrec = baselines.get(SASREC_CPU)
    if sasrec is None:
        return []
    training = sasrec.get("training") or {}
    lines = [
        "## KARMA beside SASRec at equal training CPU",
        "",
        f"SASRec trained under `max_cpu_seconds` = {sasrec['settings'].get('max_cpu_seconds'):.0f} s, the "
        f"training-loop CPU of `{study.sasrec_cpu_match}` seed {study.seeds[0]} "
        f"(it used {_num(training.get('train_cpu'), 0)} s: "
        f"{training.get('epochs')} epochs, best epoch {training.get('best_epoch')} kept by validation). "
        "Δ = preset − SASRec in points, users paired, over the preset's seeds [95% interval].",
        "",
    ]
    lines += _header(["preset", "seeds", "train CPU s", "ΔHR@10", "ΔHR@50", "ΔHR@200", "ΔNDCG@10", "ΔNDCG@200"])
    for preset, d in intervals["vs_sasrec_cpu"].items():
        cells = [f"`{preset}`", str(d["all"]["HR@10"]["seeds"]), _train_cpu(presets, baselines, preset)]
        cells += [ci(d["all"][k], 100.0, 2, signed=True) for k in ("HR@10", "HR@50", "HR@200", "NDCG@10", "NDCG@200")]
        lines.append(_row(cells))
    return [*lines, ""]


def _quality_table(study: StudyConfig, presets: Mapping[str, Any], baselines: Mapping[str, Any]) -> list[str]:
    lines = ["## Retrieval quality (test split, full ranking, mean ± sample std over seeds)", ""]
    lines += _header(["model", "seeds", *METRIC_KEYS, "train CPU s / step"])
    for name in _ordered(study, presets):
        p = presets[name]
        m = p["metrics"]["all"]
        lines.append(
            _row(
                [
                    f"`{name}`",
                    str(len(p["seeds"])),
                    *(fmt(m[k]) for k in METRIC_KEYS),
                    fmt(p["seconds"].get("train_cpu_per_step"), 2),
                ]
            )
        )
    for name, b in baselines.items():
        m = b["metrics"]["all"]
        lines.append(_row([baseline_label(name, b), "1", *(_num(m.get(k)) for k in METRIC_KEYS), "—"]))
    lines += ["", "Baselines use the same users, targets, exclusions and tie rule; their protocol lines:", ""]
    for name, b in baselines.items():
        extra = f"; SASRec settings: {b['settings']}" if name == "sasrec" else ""
        lines.append(f"- {baseline_label(name, b)} ({b['seconds']:.0f} s wall{extra}): {b['protocol']}")
    return [*lines, ""]


def _warm_cold_table(study: StudyConfig, presets: Mapping[str, Any], baselines: Mapping[str, Any]) -> list[str]:
    keys = ("HR@50", "HR@200", "NDCG@10")
    lines = ["## Warm vs cold targets (cold = items never seen in training)", ""]
    lines += _header(["model", *(f"warm {k}" for k in keys), *(f"cold {k}" for k in keys), "users warm / cold"])
    for name in _ordered(study, presets):
        m = presets[name]["metrics"]
        counts = f"{_num(m['warm']['count']['mean'], 0)} / {_num(m['cold']['count']['mean'], 0)}"
        lines.append(
            _row([f"`{name}`", *(fmt(m["warm"][k]) for k in keys), *(fmt(m["cold"][k]) for k in keys), counts])
        )
    for name, b in baselines.items():
        m = b["metrics"]
        if "cold" not in m:
            continue
        counts = f"{m['warm']['count']} / {m['cold']['count']}"
        row = [baseline_label(name, b), *(_num(m["warm"].get(k)) for k in keys)]
        lines.append(_row([*row, *(_num(m["cold"].get(k)) for k in keys), counts]))
    return [*lines, ""]


def _delta_table(study: StudyConfig, deltas: Mapping[str, Any], seed_by_seed: bool = False) -> list[str]:
    """Per-seed deltas, mean ± std; after the interval table (`seed_by_seed`) it is the seed spread view."""
    if seed_by_seed:
        lines = [f"## Against `{REFERENCE_PRESET}`, seed by seed (spread of the per-seed deltas)", ""]
    else:
        lines = [f"## Against `{REFERENCE_PRESET}` (paired by seed)", "", PAPER, ""]
    if not deltas:
        return [*lines, f"(no preset has a finished run paired with a finished `{REFERENCE_PRESET}` run yet)", ""]
    keys = ("HR@10", "HR@200", "NDCG@10", "MRR")
    segments = ["all", "cold"] if any("cold" in d for d in deltas.values()) else ["all"]
    header = ["preset", "seeds"]
    for seg in segments:
        for k in keys if seg == "all" else ("HR@200",):
            header += [f"{'' if seg == 'all' else 'cold '}Δ{k} (points)", "rel."]
    lines += _header([*header, "seeds better"])
    for preset in _ordered(study, deltas):
        d = deltas[preset]
        first = d["all"]["HR@200"]
        cells = [f"`{preset}`", str(len(first["seeds"]))]
        for seg in segments:
            for k in keys if seg == "all" else ("HR@200",):
                entry = d.get(seg, {}).get(k)
                if entry is None:
                    cells += ["—", "—"]
                    continue
                rel = entry["rel_pct"]
                cells += [fmt(entry["abs"], 2, 100.0), "—" if rel is None else f"{rel:+.1f}%"]
        cells.append(f"{first['wins']}/{len(first['seeds'])} (HR@200)")
        lines.append(_row(cells))
    lines += [
        "",
        "Δ = preset − action-only on the same seed, in HR/NDCG points (×100), mean ± std over the paired seeds; "
        "rel. = relative change of the seed-mean.",
        "",
    ]
    return lines


def _diagnostics_table(
    study: StudyConfig,
    presets: Mapping[str, Any],
    reference: Mapping[str, Any],
    warmup: Mapping[str, Any] | None,
) -> list[str]:
    names = _ordered(study, presets)
    if not names:
        return []
    before = warmup["diagnostics"]["summary"] if warmup else None
    lines = [
        f"## Collapse diagnostics ({study.diagnose_users} test users, mean ± std over seeds)",
        "",
        "Definitions: `training/diagnostics/metrics.py` (module docstring). The attention sink is the share of "
        "attention on the first position; the 'barcode' score is how alike the attention rows are (vertical stripes). "
        "Reference = the same metric for uniform causal attention / random items.",
        "",
    ]
    first = ["before the action stage"] if before else []
    lines += _header(["metric", *first, *(f"`{n}`" for n in names), "reference"])
    for key in DIAG_ROWS:
        base, _, suffix = key.partition(" · ")
        label = METRIC_LABELS.get(base, base) + (f" · {suffix}" if suffix else "")
        cells = ([_num(before.get(key))] if before else []) + [fmt(presets[n]["diagnostics"].get(key)) for n in names]
        lines.append(_row([label, *cells, _num(reference.get(key))]))
    lines += [
        "",
        "`L_recon token accuracy` is measured with each run's own recon head; presets without L_recon never "
        "trained that head, so their value is the untrained baseline, not a collapse symptom."
        + (
            f" 'Before the action stage' = `{warmup['run']}`: the same recipe stopped after the semantic warm-up "
            f"and one action step (HR@200 {warmup['metrics']['all']['HR@200']:.4f}): what the pretrained backbone "
            "brings before any click training."
            if warmup
            else ""
        ),
        "",
    ]
    return lines


def _cost_section(results: Mapping[str, Any]) -> list[str]:
    lines = ["## Zero added serving cost", ""]
    compare = results.get("compare")
    exports = [r for r in results["runs"].values() if r.get("export")]
    if not exports:
        return [*lines, "(no run exported yet)", ""]
    lines += _header(["run", "served params (query + item)", "dropped train-only params", "query FLOPs / request",
                      "parity max abs diff (query / item)"])  # fmt: skip
    for name, r in results["runs"].items():
        e = r.get("export")
        if not e:
            continue
        served = e["served_parameters"]
        lines.append(
            _row(
                [
                    name,
                    f"{served.get('query_tower', 0):,} + {served.get('item_tower', 0):,}",
                    f"{sum(e['dropped'].values()):,}",
                    f"{(e.get('cost') or {}).get('query_flops', 0):,}",
                    f"{e['parity_max_abs_diff']['query']:.1e} / {e['parity_max_abs_diff']['item']:.1e}",
                ]
            )
        )
    lines.append("")
    if compare:
        lat = compare["latency"]
        verdict = (
            "identical" if compare["identical_served_graphs"] else "DIFFERENT: " + "; ".join(compare["differences"])
        )
        lines.append(
            f"`karma compare` of `{compare['a']['run']}` and `{compare['b']['run']}`: served graphs {verdict} "
            f"(node counts, op histograms, initializer shapes, inputs/outputs, FLOPs); query-encoder latency ratio "
            f"karma / action-only p50 {lat['p50_ratio_b_over_a']:.3f}, p99 {lat['p99_ratio_b_over_a']:.3f} "
            f"({lat['requests']} interleaved batch-1 requests each, ONNX Runtime CPU, 1 thread; "
            f"p50 {lat['a']['p50_ms']:.2f} vs {lat['b']['p50_ms']:.2f} ms)."
        )
        lines.append("")
    return lines


def _figures(results: Mapping[str, Any]) -> list[str]:
    figures = results.get("figures", {})
    captions = {
        DELTAS_FIGURE: "paired ΔHR@200 against action-only per segment, 95% intervals",
        HR_FIGURE: "HR@K curves of every preset and baseline",
        CURVES_FIGURE: "training curves (first seed of every preset)",
        LAYERS_FIGURE: "attention-sink metrics per layer (first seed of every preset)",
        MAPS_FIGURE: "attention maps side by side (first seed)",
    }
    lines = ["## Figures", ""]
    for name, caption in captions.items():
        if name in figures:
            lines += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    return lines


def _per_run_table(runs: Mapping[str, Any]) -> list[str]:
    lines = ["## Every run", ""]
    lines += _header(["run", "HR@10", "HR@200", "NDCG@10", "train wall s", "invocations", "train CPU s / step",
                      "evaluate s", "diagnose s", "export s", "threads"])  # fmt: skip
    for name, r in runs.items():
        m, s = r["metrics"]["all"], r["seconds"]
        cells = [
            f"{name} (adopted)" if r.get(ADOPTED_KEY) else name,
            _num(m["HR@10"]),
            _num(m["HR@200"]),
            _num(m["NDCG@10"]),
            _num(s["train_wall"], 0),
        ]
        cells += [str(s.get("invocations", 1)), _num(s.get("train_cpu_per_step"), 2), _num(s["evaluate"], 0)]
        lines.append(_row([*cells, _num(s["diagnose"], 0), _num(s["export"], 0), str(r.get("threads", ""))]))
    lines += [
        "",
        "Wall time includes any time the job was paused or shared the CPU; CPU s / step (process CPU time over "
        "the optimizer steps of the invocations that logged it, warm-up and action steps together) does not. "
        "'—': the run predates CPU-time logging.",
        "",
    ]
    return lines


def _adopted(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    records = [*results.get("runs", {}).values(), results.get("warmup_reference") or {}]
    return [r for r in records if r.get(ADOPTED_KEY)]


def adopted_runs(results: Mapping[str, Any]) -> list[str]:
    """Names of the runs (warm-up reference included) in a results payload adopted, not trained here."""
    return [r.get("run", "?") for r in _adopted(results)]
