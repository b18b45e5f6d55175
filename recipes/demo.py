"""`karma demo`: the main job on the built-in defaults, end to end, printing each step.

synthetic data → chronological split → frozen content features → statistics → train → evaluate →
export an ONNX + FAISS bundle and search it in-process → `karma serve` as its own process, replay a
test user's clicks through `POST /events`, then a real `POST /search` by user id, then adds an item
live (`POST /items`, the bundle's own text encoder) and clicks it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from karma.config import KarmaConfig


def split_counts(split) -> dict[str, int]:
    return {
        "train_examples": len(split.train_pos),
        "valid_users": len(split.valid_pos),
        "test_users": len(split.test_pos),
    }


def run_demo(cfg: KarmaConfig) -> None:
    """The main job on the built-in defaults: data → split → features → stats → train → evaluate."""
    from training.data.registry import load_dataset
    from training.data.report import print_stats
    from training.data.split import split_dataset
    from training.data.stats import compute_stats
    from training.features import build_item_features
    from training.trainer import run_dir
    from training.trainer import train as run_training

    steps = 7
    typer.echo(f"[1/{steps}] data set '{cfg.data.name}'")
    start = time.perf_counter()
    dataset = load_dataset(cfg)
    elapsed = time.perf_counter() - start
    typer.echo(f"      {dataset.interactions.n_events:,} events, {dataset.catalog.n_items:,} items ({elapsed:.1f} s)")
    typer.echo(f"[2/{steps}] leave-one-out chronological split")
    split = split_dataset(dataset, cfg.data.min_history, cfg.data.max_history)
    typer.echo(f"      {split_counts(split)}  fingerprint {split.fingerprint()[:16]}")
    typer.echo(f"[3/{steps}] frozen content features ({cfg.features.text_encoder})")
    start = time.perf_counter()
    features = build_item_features(dataset.catalog, cfg)
    blocks = ", ".join(f"{b.name}={b.dim}" for b in features.layout.blocks)
    elapsed = time.perf_counter() - start
    typer.echo(f"      {features.matrix.shape[0]:,} x {features.layout.dim} [{blocks}] ({elapsed:.1f} s)")
    typer.echo(f"[4/{steps}] statistics")
    print_stats(compute_stats(dataset), split, cfg)
    typer.echo(f"[5/{steps}] train ({cfg.model.backbone} backbone, preset {cfg.loss.preset}) and evaluate on test")
    if cfg.train.run_name is None:
        cfg.train.run_name = DEMO_RUN_NAME
    result = run_training(cfg, force=True)  # the demo rebuilds its run from scratch every time
    typer.echo(
        f"      {result['targets']:,} training targets in {result['train_cpu_seconds']:.0f} CPU s "
        f"({result['targets_per_cpu_second']:.0f}/CPU s); run folder {run_dir(cfg)}"
    )
    typer.echo(f"[6/{steps}] export the served towers to an ONNX + FAISS bundle and search it")
    bundle_dir = cfg.paths.artifacts / "bundles" / cfg.train.run_name
    _demo_export_and_search(run_dir(cfg) / "checkpoint", bundle_dir, dataset, split)
    typer.echo(f"[7/{steps}] serve the bundle (karma serve): POST /events, POST /search, POST /items")
    _demo_serve_and_search(bundle_dir, cfg, dataset, split)
    _demo_next_steps(run_dir(cfg), bundle_dir)


def _demo_next_steps(run: Path, bundle_dir: Path) -> None:
    """Where the demo left its results, and the commands that take it further."""
    plots = sorted(run.rglob("*.png"))
    exe = Path(sys.executable).with_name("karma")
    karma = str(exe.relative_to(Path.cwd())) if exe.is_file() and exe.is_relative_to(Path.cwd()) else "karma"
    typer.echo("demo: done")
    typer.echo(f"  plots ({len(plots)}): " + (", ".join(str(p) for p in plots) if plots else "none"))
    if (run / "tensorboard").is_dir():
        board = exe.with_name("tensorboard")
        board_cmd = (
            str(board.relative_to(Path.cwd()))
            if board.is_file() and board.is_relative_to(Path.cwd())
            else "tensorboard"
        )
        typer.echo(f"  training log: {run / 'train_log.jsonl'}   {board_cmd} --logdir {run / 'tensorboard'}")
    typer.echo(f"  serve it:     {karma} serve --bundle {bundle_dir}   (then POST /search; API docs at /docs)")
    typer.echo(f"  evaluate:     {karma} evaluate {run}   collapse diagnostics: {karma} diagnose {run}")


DEMO_ADMIN_KEY = "demo-admin-key-not-secret"  # the demo's own server, on localhost, for its one POST /items


def _demo_serve_and_search(bundle_dir: Path, cfg: KarmaConfig, dataset, split) -> None:
    """Start `karma serve` as its own process, replay a test user's clicks into Redis, search by user id."""
    import httpx

    from service.launcher import karma_serve

    admin = {"Authorization": f"Bearer {DEMO_ADMIN_KEY}"}
    env = {"KARMA_SERVE__ADMIN_API_KEY": DEMO_ADMIN_KEY}
    with (
        karma_serve(bundle_dir, cfg.serve.redis_url, env=env) as (base, _),
        httpx.Client(base_url=base, timeout=30.0) as client,
    ):
        position = int(split.test_pos[0])
        user = str(dataset.interactions.user_ids[split.seq_users[position]])
        start = split.user_offsets[split.seq_users[position]]
        history = [str(dataset.catalog.item_ids[i]) for i in split.seq_items[max(start, position - 10) : position]]
        for item_id in history:
            client.post("/events", json={"user_id": user, "item_id": item_id}).raise_for_status()
        queries = dataset.interactions.query
        query = queries[split.seq_events[position]] if queries is not None else None
        body = {"user_id": user, "k": 5, **({"query": query} if query else {})}
        response = client.post("/search", json=body)
        response.raise_for_status()
        result = response.json()
        typer.echo(f"      POST {base}/search {json.dumps(body)}")
        typer.echo(
            f"      model {result['model_version']}, history from Redis: {result['history_used']} items, "
            f"timings_ms {json.dumps(result['timings_ms'])}"
        )
        target = str(dataset.catalog.item_ids[split.seq_items[position]])
        for item in result["items"]:
            mark = "  <- the clicked item" if item["item_id"] == target else ""
            typer.echo(f"        {item['score']:6.3f}  {item['item_id']}  {item.get('title') or ''}{mark}")
        # an item that arrives live: featurised by the bundle's own text encoder, indexed, then clicked
        fields = dataset.catalog.text_fields
        clicked = dataset.catalog.items.iloc[int(split.seq_items[position])]
        text = {f: f"{clicked[f]}" for f in fields if str(clicked[f] or "")}
        text[fields[0]] = f"{text.get(fields[0], '')} (new edition)"
        r = client.post("/items", json={"items": [{"item_id": "demo-new-1", "text": text}]}, headers=admin)
        r.raise_for_status()
        added = r.json()
        typer.echo(f"      POST {base}/items demo-new-1 {json.dumps(text)} -> row {added['items'][0]['row']}, "
                   f"{added['timings_ms']['total']:.1f} ms ({added['note']})")  # fmt: skip
        client.post("/events", json={"user_id": user, "item_id": "demo-new-1"}).raise_for_status()
        again = client.post("/search", json={**body, "exclude_history": True}).json()
        typer.echo(f"      after clicking it: history {again['history_used']} items, unknown {again['unknown_items']}, "
                   f"top: {[i['item_id'] for i in again['items'][:3]]}")  # fmt: skip


def _demo_export_and_search(checkpoint: Path, bundle_dir: Path, dataset, split) -> None:
    """Export, reload the bundle as the service will, and rank one test user's next item."""
    import numpy as np

    from export.bundle_writer import export_checkpoint
    from karma.bundle import load_bundle

    result = export_checkpoint(checkpoint, bundle_dir, force=True)
    parity = result.manifest.parity["query"]["max_abs_diff"]
    typer.echo(f"      {bundle_dir}  model_version {result.manifest.model_version}  parity max|Δh| {parity:.1e}")
    bundle = load_bundle(bundle_dir)
    sessions = bundle.open_sessions()
    position = int(split.test_pos[0])
    history = split.seq_items[split.user_offsets[split.seq_users[position]] : position]
    query = dataset.interactions.query[split.seq_events[position]] if dataset.interactions.query is not None else ""
    h = sessions.encode_query(bundle.query_feeds([query or ""], [history]))
    scores, rows = bundle.index.search(np.ascontiguousarray(h, dtype=np.float32), 5)
    titles = bundle.items.iloc[rows[0]]
    target = dataset.catalog.item_ids[split.seq_items[position]]
    typer.echo(f"      query {query!r}, {len(history)} history items; next item actually clicked: {target}")
    for score, (_, row) in zip(scores[0], titles.iterrows(), strict=True):
        label = row.get("title", "")
        mark = "  <- the clicked item" if row["item_id"] == target else ""
        typer.echo(f"        {score:6.3f}  {row['item_id']}  {label}{mark}")


DEMO_RUN_NAME = "default"  # karma demo's run and bundle: artifacts/runs/default, artifacts/bundles/default
