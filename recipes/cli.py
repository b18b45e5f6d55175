"""The `karma` command line.

Every subcommand takes `--config FILE` and repeatable `--set KEY=VALUE` overrides (see
`karma.config`). User-caused failures (`KarmaError`) print one `error: ...` line and exit 2; a
traceback means a bug in KARMA, not in the input. Heavy imports (pandas, torch) happen inside
the commands so `karma --help` stays instant.
"""

from __future__ import annotations

import enum
import inspect
import json
import logging
import os
import shlex
import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from bench.config import PARTS, BenchConfig
from karma.config import KarmaConfig, config_to_yaml, load_config
from karma.errors import KarmaError
from karma.machine import THREAD_ENV

app = typer.Typer(
    help="KARMA: LLM next-interest embeddings for personalized search (train → export → serve).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Data sets: stats, features.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"karma-search {version('karma-search')}")
        except PackageNotFoundError:
            typer.echo("karma-search (not installed as a package)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """KARMA: LLM next-interest embeddings for personalized search (train → export → serve)."""


app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML or TOML config file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override, e.g. data.synthetic.n_items=1000.")]
NameArg = Annotated[str | None, typer.Argument(help="Data set (default: data.name): synthetic, ml-100k, ml-1m, ...")]

log = logging.getLogger("karma")


def _setup(config_path: Path | None, overrides: list[str] | None) -> KarmaConfig:
    config = load_config(config_path, overrides or [])
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    return config


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the effective configuration (defaults + file + KARMA_* env + --set) as YAML."""
    typer.echo(config_to_yaml(load_config(config, set_ or [])), nl=False)


@config_app.command("reference")
def config_reference_cmd() -> None:
    """Print every config key (env variable, type, default, description) as Markdown (docs/CONFIG.md)."""
    from karma.config import config_reference

    typer.echo(config_reference(), nl=False)


@data_app.command("stats")
def data_stats(
    name: NameArg = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the numbers here.")] = None,
) -> None:
    """Users, items, events, history lengths, popularity concentration, cold items, split sizes."""
    from recipes.demo import split_counts
    from training.data.registry import load_dataset
    from training.data.report import print_stats
    from training.data.split import split_dataset
    from training.data.stats import compute_stats

    cfg = _setup(config, set_)
    dataset = load_dataset(cfg, name)
    split = split_dataset(dataset, cfg.data.min_history, cfg.data.max_history)
    stats = compute_stats(dataset)
    print_stats(stats, split, cfg)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {**stats.to_dict(), "split": split_counts(split)}
        json_out.write_text(json.dumps(payload, indent=2))


@data_app.command("features")
def data_features(name: NameArg = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Compute (or load from cache) the frozen item content features and save them beside the data."""
    from training.data.registry import cache_key, load_dataset
    from training.features import build_item_features

    cfg = _setup(config, set_)
    dataset = load_dataset(cfg, name)
    features = build_item_features(dataset.catalog, cfg)
    out = cfg.paths.data / cache_key(name or cfg.data.name, cfg) / "features"
    features.save(out)
    typer.echo(f"features: {features.matrix.shape[0]} items x {features.layout.dim} dims -> {out}")
    for block in features.layout.blocks:
        typer.echo(f"  {block.name}: {block.dim}")


@app.command()
def demo(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The main job on the built-in defaults: data → split → features → stats → train → evaluate → export →
    serve → a real POST /search (recipes/demo.py)."""
    from recipes.demo import run_demo

    run_demo(_setup(config, set_))


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    preset: Annotated[
        str | None, typer.Option(help="Loss preset: action-only, gen, recon, karma-text, karma, img-mse.")
    ] = None,
    run_name: Annotated[
        str | None,
        typer.Option("--run-name", help="Run folder under paths.artifacts/runs (default: <preset>-<data set>)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run's last checkpoint if there is one.")] = False,
    force: Annotated[bool, typer.Option(help="Replace a run folder that already holds a checkpoint.")] = False,
) -> None:
    """Train the query/item towers with the configured KARMA regularizers, then evaluate on test.

    Never overwrites a run silently: a run folder that already holds a checkpoint is refused unless
    --resume (continue it) or --force (replace it); --run-name picks another folder."""
    overrides = list(set_ or [])
    if preset is not None:
        overrides.append(f"loss.preset={preset}")
    if run_name is not None:
        overrides.append(f"train.run_name={run_name}")
    if resume and force:
        raise KarmaError("karma train: --resume continues a run and --force replaces it; pass one of them")
    cfg = _setup(config, overrides)
    from training.trainer import run_dir
    from training.trainer import train as run_training

    typer.echo(f"run folder: {run_dir(cfg)}")  # train() refuses it first thing if it holds a checkpoint
    run_training(cfg, resume=resume, force=force)


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A run folder (artifacts/runs/NAME) or its checkpoint folder.")],
    which: Annotated[str, typer.Option("--split", "--which", help="valid or test (as in karma baselines).")] = "test",
    set_: SetOpt = None,
) -> None:
    """Full-ranking evaluation of a checkpoint on the data it was trained on (+ most-popular)."""
    from training.checkpoint import read_checkpoint_info, resolve_checkpoint
    from training.evaluate import evaluate_checkpoint

    if which not in {"valid", "test"}:
        raise KarmaError(f"--split must be 'valid' or 'test', got {which!r}")
    _setup(None, [])
    checkpoint = resolve_checkpoint(checkpoint)
    info = read_checkpoint_info(checkpoint)
    for item in set_ or []:  # eval-only knobs may be overridden (e.g. eval.max_users)
        key = item.partition("=")[0]
        if not key.startswith("eval.") and not key.startswith("paths."):
            raise KarmaError(f"evaluate: only eval.* and paths.* may be overridden, not {key!r}")
    cfg = load_config(overrides=set_ or [], environ=_run_environ(), base=info.config)
    evaluate_checkpoint(checkpoint, cfg, which)


RUN_ENV_PREFIXES = ("KARMA_EVAL__", "KARMA_PATHS__")  # what may change when re-reading a trained run


def _run_environ() -> dict[str, str]:
    """The KARMA_EVAL__* / KARMA_PATHS__* variables: the env layer for commands that read a checkpoint's config
    (its architecture and data come from the checkpoint; the protocol and output folders may be overridden)."""
    return {k: v for k, v in os.environ.items() if k.startswith(RUN_ENV_PREFIXES)}


@app.command()
def diagnose(
    checkpoint: Annotated[Path, typer.Argument(help="A run's checkpoint folder (or the run folder).")],
    other: Annotated[
        Path | None, typer.Option("--other", help="A second checkpoint to compare side by side (e.g. action-only).")
    ] = None,
    users: Annotated[int, typer.Option("--users", min=2, help="Test users to diagnose (the first N).")] = 256,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: <run>/diagnostics[_vs_<other run>]).")
    ] = None,
) -> None:
    """Collapse diagnostics: attention sinks/barcodes per layer, effective rank, L_recon fidelity, category Jaccard."""
    from training.diagnostics import run_diagnostics

    _setup(None, [])
    run_diagnostics([checkpoint] if other is None else [checkpoint, other], n_users=users, out_dir=out)


@app.command("export")
def export_bundle(
    checkpoint: Annotated[Path, typer.Argument(help="A run folder (artifacts/runs/NAME) or its checkpoint folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write (atomically).")],
    index: Annotated[str, typer.Option(help="FAISS index: flat (exact, default), hnsw or ivfpq.")] = "flat",
    index_param: Annotated[
        list[str] | None, typer.Option("--index-param", help="Index parameter, e.g. nprobe=32 (repeatable).")
    ] = None,
    exporter: Annotated[str, typer.Option(help="ONNX exporter: torchscript (opset 17) or dynamo (opset 18).")] = (
        "torchscript"
    ),
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's tested one).")] = None,
    optimize: Annotated[
        bool,
        typer.Option(
            "--optimize",
            help="Ship ORT-optimised encoders (offline ORT_ENABLE_EXTENDED fusions; ONNX Runtime CPU only). "
            "Parity tolerance stays 1e-4.",
        ),
    ] = False,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize",
            help="int8: ship dynamically quantised encoders (int8 MatMul weights). Parity: min cosine >= 0.99. "
            "Measure the speed/HR@200 trade-off with benchmarks/bench_export_variants.py.",
        ),
    ] = None,
    int8_keep_fp32: Annotated[
        list[str] | None,
        typer.Option(
            "--int8-keep-fp32",
            help="With --quantize int8: MatMuls (node/weight name contains this) left fp32, repeatable. "
            "Default: mlp/down_proj (LLM activation outliers). 'none' quantises every weight MatMul.",
        ),
    ] = None,
    text_encoder: Annotated[
        bool,
        typer.Option(
            "--text-encoder/--no-text-encoder",
            help="Ship the item text encoder (MiniLM as ONNX, ~90 MB; nothing for hashing) so POST /items can add "
            "items live. --no-text-encoder: a fixed catalog.",
        ),
    ] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle folder.")] = False,
    set_: SetOpt = None,
) -> None:
    """Export a checkpoint to a bundle: ONNX query/item encoders (heads stripped), FAISS index, manifest."""
    from export.bundle_writer import export_checkpoint
    from export.index import parse_index_params
    from training.checkpoint import resolve_checkpoint

    _setup(None, [])
    result = export_checkpoint(
        resolve_checkpoint(checkpoint),
        out,
        index=index,
        index_params=parse_index_params(index_param or []),
        exporter=exporter,
        opset=opset,
        overrides=set_ or [],
        force=force,
        optimize=optimize,
        quantize=quantize,
        int8_keep_fp32=None if not int8_keep_fp32 else [p for p in int8_keep_fp32 if p.lower() != "none"],
        text_encoder=text_encoder,
    )
    m = result.manifest
    typer.echo(f"bundle {result.directory}  model_version {m.model_version}  ({result.seconds:.1f} s)")
    typer.echo(
        f"  {m.onnx.exporter} exporter, opset {m.onnx.opset}; dims F={m.dims.feature_dim} D={m.dims.embed_dim} "
        f"hidden={m.dims.hidden}; {m.n_items:,} items; index {m.index.type} {m.index.params or ''}".rstrip()
    )
    variant = m.onnx.variant
    line = f"  encoders: {variant.name}"
    if variant.optimized:
        line += f"; ORT {variant.optimization_level} optimisation baked in (ONNX Runtime {variant.onnxruntime_version})"
    if variant.quantization:
        q, i = variant.quantization["query_encoder"], variant.quantization["item_encoder"]
        line += (
            f"; int8 MatMuls ({q.get('weight_range', '8-bit')} weights): query {q['quantized_matmuls']}, "
            f"item {i['quantized_matmuls']}"
            f" (fp32 kept: {q['kept_fp32_matmuls']} matching {q['kept_fp32_patterns']})"
        )
    typer.echo(line)
    for name, size in sorted(result.file_sizes().items()):
        typer.echo(f"  {name:<24} {size:>12,} bytes")
    served = m.served_parameters
    dropped = sum(d.parameters for d in m.dropped)
    typer.echo(
        f"  served parameters: query tower {served['query_tower']:,} + item tower {served['item_tower']:,}; "
        f"dropped (train-only): {dropped:,} in {', '.join(d.module for d in m.dropped) or 'nothing'}"
    )
    if m.parity:
        q, i = m.parity["query"], m.parity["item"]
        criterion = m.parity.get("criterion") or {"metric": "max_abs_diff", "tolerance": m.parity["tolerance"]}
        limit = (
            f"min cosine >= {criterion['min_cosine']} (random queries >= {criterion['random_query_min_cosine']}); "
            f"real queries {q['min_cosine_real']:.4f}, random queries {q['min_cosine_random']:.4f}"
            if criterion["metric"] == "min_cosine"
            else f"max |diff| <= {criterion['tolerance']:.0e}"
        )
        typer.echo(
            f"  parity vs PyTorch ({q['cases']} query + {i['cases']} item cases, batch {m.parity['batch_sizes']}, "
            f"history {m.parity['history_lengths']}): max |diff| query {q['max_abs_diff']:.1e} item "
            f"{i['max_abs_diff']:.1e}; min cosine {min(q['min_cosine'], i['min_cosine']):.7f} (required: {limit})"
        )


def _baselines(**given: Any) -> None:
    """Most-popular, frozen content and SASRec under the full-ranking protocol (SASRec knobs: --epochs …)."""
    from recipes.baselines import run_baselines_command

    run_baselines_command(**given)


def _baselines_signature() -> inspect.Signature:
    """`karma baselines`' parameters: the fixed ones, then one --flag per SASRecConfig field (one source)."""
    from dataclasses import fields

    from training.baselines_config import BASELINES, SASRecConfig

    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter(
            "dataset", kw, annotation=Annotated[str, typer.Argument(help="Data set: synthetic, ml-1m, …")]
        ),
        inspect.Parameter("config", kw, default=None, annotation=ConfigOpt),
        inspect.Parameter("set_", kw, default=None, annotation=SetOpt),
        inspect.Parameter(
            "which",
            kw,
            default=",".join(BASELINES),
            annotation=Annotated[str, typer.Option(help=f"Comma-separated baselines: {', '.join(BASELINES)}.")],
        ),
        inspect.Parameter(
            "split",
            kw,
            default="test",
            annotation=Annotated[str, typer.Option(help="valid or test (as karma evaluate).")],
        ),
        inspect.Parameter("device", kw, default="cpu", annotation=Annotated[str, typer.Option(help="cpu or cuda.")]),
        inspect.Parameter(
            "json_out",
            kw,
            default=None,
            annotation=Annotated[Path | None, typer.Option("--json", help="Also write the metrics as JSON here.")],
        ),
    ]
    hints = typing.get_type_hints(SASRecConfig)
    for f in fields(SASRecConfig):
        hint = hints[f.name]
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
        kinds = [k for k in (typing.get_args(hint) or (hint,)) if k is not type(None)]
        kind = enum.Enum(f.name, {c: c for c in choices}) if choices else kinds[0]  # typer shows an Enum as choices
        option = typer.Option(f"--{f.name.replace('_', '-')}", help=f"SASRec {f.name}.")
        default = kind(f.default) if choices else f.default
        params.append(
            inspect.Parameter(f"sasrec_{f.name}", kw, default=default, annotation=Annotated[kind | None, option])
        )
    return inspect.Signature(params)


_baselines.__signature__ = _baselines_signature()  # type: ignore[attr-defined]
app.command("baselines")(_baselines)


@app.command()
def compare(
    bundle_a: Annotated[Path, typer.Argument(help="Baseline bundle, e.g. the action-only export.")],
    bundle_b: Annotated[Path, typer.Argument(help="Bundle to compare, e.g. the karma export.")],
    requests: Annotated[int, typer.Option(help="Interleaved timed requests per bundle.")] = 300,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report here.")] = None,
) -> None:
    """Zero-added-serving-cost report: served graphs, parameters, FLOPs and latency of two bundles.

    Exits 1 when the served graphs differ in anything but weight values.
    """
    from rich.console import Console
    from rich.table import Table

    from export.compare import compare_bundles

    _setup(None, [])
    report = compare_bundles(bundle_a, bundle_b, requests=requests)
    a, b = report["a"]["preset"], report["b"]["preset"]
    table = Table(title=f"served cost: {a} ({bundle_a}) vs {b} ({bundle_b})")
    for col in ("", a, b):
        table.add_column(col, justify="right")
    for name, graph in report["graphs"].items():
        table.add_row(f"{name} nodes", str(graph["a"]["nodes"]), str(graph["b"]["nodes"]))
        table.add_row(f"{name} parameters", f"{graph['a']['parameters']:,}", f"{graph['b']['parameters']:,}")
        table.add_row(
            f"{name} distinct ops", str(len(graph["a"]["op_histogram"])), str(len(graph["b"]["op_histogram"]))
        )
    cost_a, cost_b = report["cost"]["a"] or {}, report["cost"]["b"] or {}
    table.add_row("query FLOPs / request", f"{cost_a.get('query_flops', 0):,}", f"{cost_b.get('query_flops', 0):,}")
    table.add_row(
        "item FLOPs / item", f"{cost_a.get('item_flops_per_item', 0):,}", f"{cost_b.get('item_flops_per_item', 0):,}"
    )
    dropped = report["dropped_train_only_parameters"]
    table.add_row("train-only parameters dropped", f"{dropped['a']:,}", f"{dropped['b']:,}")
    lat = report["latency"]
    table.add_row("query encoder p50 ms", f"{lat['a']['p50_ms']:.3f}", f"{lat['b']['p50_ms']:.3f}")
    table.add_row("query encoder p99 ms", f"{lat['a']['p99_ms']:.3f}", f"{lat['b']['p99_ms']:.3f}")
    Console(width=140).print(table)
    typer.echo(
        f"latency ratio {b}/{a}: p50 {lat['p50_ratio_b_over_a']:.3f}, p99 {lat['p99_ratio_b_over_a']:.3f} "
        f"({lat['requests']} interleaved requests each, batch 1, {lat['history_items']} history items, "
        "ONNX Runtime CPU, 1 thread)"
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2, default=str))
    if report["identical_served_graphs"]:
        typer.echo("served graphs identical in structure, parameter count and FLOPs: zero added serving cost")
    else:
        typer.echo("served graphs DIFFER: " + "; ".join(report["differences"]), err=True)
        raise typer.Exit(1)


@app.command()
def study(
    study_file: Annotated[Path | None, typer.Argument(help="Study file, e.g. studies/ml-1m.yaml.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="The study file, as an option.")] = None,
    set_: SetOpt = None,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Only regenerate RESULTS.md, results.json and figures.")
    ] = False,
    max_runs: Annotated[
        int | None, typer.Option("--max-runs", min=0, help="Train at most N new runs this invocation.")
    ] = None,
    artifacts: Annotated[
        Path | None, typer.Option("--artifacts", help="Runs and caches folder (default artifacts/studies/NAME).")
    ] = None,
    report_dir: Annotated[
        Path | None, typer.Option("--report-dir", help="Report folder (default: the study's, docs/results/NAME).")
    ] = None,
    rediagnose_runs: Annotated[
        bool,
        typer.Option(
            "--rediagnose", help="Recompute finished runs' diagnostics with the current code, then only report."
        ),
    ] = False,
    runs: Annotated[
        str | None,
        typer.Option("--runs", help="Train only these runs (comma-separated, e.g. karma-s2,gen-s0,sasrec)."),
    ] = None,
    adopt: Annotated[
        Path | None,
        typer.Option(
            "--adopt",
            help="First write back the finished runs recorded in this results.json (same configuration only) "
            "when their artifacts are gone, so only the missing runs train.",
        ),
    ] = None,
) -> None:
    """Ablation study: every preset x seed on the same backbone, data and budget, plus baselines; one report.

    Finished runs are reused and an interrupted run resumes, so the command can be re-run at any time.
    `--set` overrides apply to every run (and are printed in the report).
    """
    from recipes.study import load_study, rediagnose, run_study

    if (study_file is None) == (config is None):
        raise KarmaError("karma study: give one study file, e.g. karma study studies/ml-1m.yaml (or --config FILE)")
    config = study_file or config
    assert config is not None
    _setup(None, [])
    spec = load_study(config)
    extra = list(set_ or [])
    if any(item.partition("=")[0].strip() == "paths.artifacts" for item in extra):
        raise KarmaError("karma study: give the study's folder with --artifacts, not --set paths.artifacts")
    spec = spec.model_copy(update={k: v for k, v in (("artifacts", artifacts), ("report_dir", report_dir)) if v})
    spec.run_config(spec.presets[0], spec.seeds[0], extra)  # a bad --set fails here, naming itself
    options = "".join(f" --set {item}" for item in extra)
    options += f" --artifacts {artifacts}" if artifacts else ""
    options += f" --report-dir {report_dir}" if report_dir else ""
    command = f"karma study --config {config}{options}"
    if adopt is not None:
        from recipes.study.adopt import adopt_results

        outcome = adopt_results(spec, adopt, extra)
        typer.echo(
            f"adopted {len(outcome['adopted'])} run(s) from {adopt}; {len(outcome['kept'])} already here"
            + "".join(f"\n  refused {why}" for why in outcome["refused"])
        )
    if rediagnose_runs:
        typer.echo(f"re-diagnosed {len(rediagnose(spec, extra))} finished run(s)")
    only = [name.strip() for name in runs.split(",") if name.strip()] if runs else None
    results = run_study(
        spec, extra, report_only=report_only or rediagnose_runs, max_runs=max_runs, command=command, only=only
    )
    status = results["status"]
    typer.echo(
        f"study {spec.name}: {status['finished']}/{status['planned']} runs finished; "
        f"report: {spec.report_path / 'RESULTS.md'}"
    )


@app.command()
def serve(
    bundle: Annotated[
        Path | None, typer.Option("--bundle", "-b", help="Bundle folder to serve (default: serve.bundle).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind (default: serve.host).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default: serve.port).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Serve a bundle over HTTP: /search, /events, /users/{id}/history, /healthz, /readyz, /info, /metrics."""
    import os

    if "numpy" in sys.modules:
        log.warning("numpy was imported before the thread limits were set; BLAS may use several threads")
    os.environ.update(THREAD_ENV)  # fixed before anything imports numpy
    overrides = list(set_ or [])
    if bundle is not None:
        overrides.append(f"serve.bundle={bundle}")
    if host is not None:
        overrides.append(f"serve.host={host}")
    if port is not None:
        overrides.append(f"serve.port={port}")
    cfg = load_config(config, overrides)
    if cfg.serve.bundle is None:
        raise KarmaError("karma serve: no bundle given (--bundle DIR or serve.bundle)")
    from karma.bundle import read_manifest

    read_manifest(cfg.serve.bundle)  # an obvious mistake (wrong folder) is one line, before uvicorn starts
    _check_port_free(cfg.serve.host, cfg.serve.port)  # before minutes of loading, not after

    import uvicorn

    from service.app import create_app
    from service.logs import configure_json_logging
    from service.transport import uvicorn_options

    configure_json_logging(cfg.log_level)
    app_ = create_app(cfg)
    uvicorn.run(app_, **uvicorn_options(cfg.serve, app_.state.metrics))


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise KarmaError(
                f"karma serve: cannot listen on {host}:{port} ({exc.strerror or exc}); pick another with --port"
            ) from None


def _csv(kind: type) -> Any:
    """A typer parser for comma-separated values ("50,200" -> [50.0, 200.0])."""

    def parse(text: str) -> list[Any]:
        try:
            return [kind(float(x)) if kind is int else kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter(f"{text!r} is not a comma-separated list of {kind.__name__}s") from None

    return parse


_BENCH = BenchConfig()
_B = "karma bench"


@app.command()
def bench(
    out: Annotated[Path | None, typer.Option(help=f"Results folder (default {_BENCH.out}).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Smoke run: 1k-item tiny model, short runs (~3 min).")] = False,
    parts: Annotated[
        str | None, typer.Option(help=f"Comma-separated subset of {','.join(PARTS)} (default all).")
    ] = None,
    backends: Annotated[
        str | None, typer.Option(help="Part serving: comma-separated subset of service,batching off,naive.")
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(help="Model of the built bundles and the knobs that suit it: tiny (default) or smollm2."),
    ] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(help="Part serving: one more service backend, 'NAME:KEY=VALUE[,KEY=VALUE]' (repeatable)."),
    ] = None,
    history_mix: Annotated[
        str | None, typer.Option(help="fixed (default): every body has --history items; uniform: 1..that many.")
    ] = None,
    stage_requests: Annotated[
        int | None, typer.Option(min=1, help=f"Part stages: sequential requests ({_BENCH.stage_requests}).")
    ] = None,
    floor_batches: Annotated[
        str | None, typer.Option(help=f"Part floor: batch sizes ({','.join(map(str, _BENCH.floor_batches))}).")
    ] = None,
    bundle_a: Annotated[Path | None, typer.Option(help="Action-only bundle (part zero-cost).")] = None,
    bundle_b: Annotated[
        Path | None, typer.Option(help="Karma bundle: the served one (parts serving, zero-cost).")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Bundle b's training checkpoint (the naive baseline).")
    ] = None,
    workdir: Annotated[Path | None, typer.Option(help="Build the bundles here (default <out>/work).")] = None,
    int8_bundle: Annotated[
        Path | None, typer.Option(help="Part floor: the checkpoint's `karma export --quantize int8`, measured too.")
    ] = None,
    items: Annotated[
        int | None, typer.Option(min=1, help=f"Synthetic catalog size of built bundles ({_BENCH.items:,}).")
    ] = None,
    train_set: Annotated[
        list[str] | None, typer.Option(help="Training override for built bundles (repeatable).")
    ] = None,
    history: Annotated[
        int | None, typer.Option(min=0, help="History items per request (default: max_history).")
    ] = None,
    k: Annotated[int | None, typer.Option(min=1, help=f"Results per request ({_BENCH.k}).")] = None,
    rates: Annotated[
        str | None, typer.Option(help=f"Fixed arrival rates, req/s ({','.join(map(str, _BENCH.rates))}).")
    ] = None,
    warmup: Annotated[float | None, typer.Option(min=0, help=f"Warm-up s per run ({_BENCH.warmup_s}).")] = None,
    duration: Annotated[float | None, typer.Option(min=0, help=f"Measured s per run ({_BENCH.duration_s}).")] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help=f"In flight at saturation ({_BENCH.concurrency}).")
    ] = None,
    slo_p99_ms: Annotated[
        float | None, typer.Option(min=0, help=f"p99 budget of the capacity search ({_BENCH.slo_p99_ms}).")
    ] = None,
    probes: Annotated[
        int | None, typer.Option(min=0, help=f"Capacity bisection probes per backend ({_BENCH.probes}).")
    ] = None,
    probe_s: Annotated[float | None, typer.Option(min=0, help=f"Measured s per probe ({_BENCH.probe_s}).")] = None,
    zero_cost_s: Annotated[
        float | None, typer.Option(min=0, help=f"Measured s of the A/B run ({_BENCH.zero_cost_s}).")
    ] = None,
    zero_cost_blocks: Annotated[
        int | None, typer.Option(min=1, help=f"Blocks for the ratio spread ({_BENCH.zero_cost_blocks}).")
    ] = None,
    index_sizes: Annotated[
        str | None, typer.Option(help=f"Index bench sizes ({','.join(map(str, _BENCH.index_sizes))}).")
    ] = None,
    index_dim: Annotated[
        int | None, typer.Option(min=1, help="Index bench vector width (default: the served D).")
    ] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis for the servers (default: serve.redis_url).")] = None,
    seed: Annotated[int | None, typer.Option(help=f"Seed ({_BENCH.seed}).")] = None,
) -> None:
    """Serving benchmark: service vs naive PyTorch baseline, batching on/off, KARMA vs action-only, FAISS
    indexes; writes JSON, Markdown and PNG plots (artifacts/bench). Parts and method: bench/runner.py."""
    from bench.runner import main as run_bench

    lists = {
        "parts": (parts, str),
        "backends": (backends, str),
        "rates": (rates, float),
        "index_sizes": (index_sizes, int),
        "floor_batches": (floor_batches, int),
    }
    parsed = {name: None if text is None else _csv(kind)(text) for name, (text, kind) in lists.items()}
    for name in ("parts", "backends"):
        parsed[name] = tuple(parsed[name]) if parsed[name] is not None else None
    given = {
        **parsed, "out": out, "bundle_a": bundle_a, "bundle_b": bundle_b, "checkpoint": checkpoint, "workdir": workdir,
        "items": items, "train_sets": train_set, "history": history, "k": k, "warmup_s": warmup,
        "duration_s": duration, "concurrency": concurrency, "slo_p99_ms": slo_p99_ms, "probes": probes,
        "probe_s": probe_s, "zero_cost_s": zero_cost_s, "zero_cost_blocks": zero_cost_blocks,
        "index_dim": index_dim, "redis_url": redis_url, "seed": seed, "profile": profile, "variants": variant,
        "history_mix": history_mix, "stage_requests": stage_requests, "int8_bundle": int8_bundle,
    }  # fmt: skip
    run_bench(quick, given, shlex.join([_B, *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else _B)


def main() -> None:
    """Console entry point: one line per user-caused error, exit status 2."""
    try:
        app()
    except KarmaError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
