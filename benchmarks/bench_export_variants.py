"""fp32 vs ORT-optimised vs int8 vs optimised+int8 encoders of one checkpoint: speed and HR@200.

For one checkpoint: export the fp32 ONNX encoders once (the same path `karma export` takes), derive
the three variants from those very files (`export.optimize.make_variant`), and measure for each

* query-encoder latency at batch 1 and batch 32, `max_history` (50) history items per request,
  all variants interleaved request by request (rotating order) on identical inputs, p50/p99/mean,
  ONNX Runtime CPU with 1 intra-op and 1 inter-op thread (as `Bundle.open_sessions` opens them);
* item-encoder throughput over the whole catalog (chunks of 4096, as export computes the index);
* session start-up time and file sizes;
* HR@K / NDCG@K on the test split, full ranking, history excluded (`training.evaluation`): user
  vectors from the variant's query session fed exactly what the service builds (the bundle
  tokenizer + `karma.featurize.pad_histories` / `history_features`, batches of 32 = the service's
  default max batch), item vectors from the variant's item session; plus agreement with PyTorch
  (cosine of h and of item vectors, top-10 overlap, users whose hit@200 flips) and the batch
  dependence of h (same user encoded alone vs in its batch of 32: int8 activation scales are
  per tensor, i.e. per batch).

Variants: fp32, optimized, int8 (the export default: decoder MLP down-projections kept fp32),
optimized+int8, and "int8, all MatMuls" (nothing kept fp32) to show what that exclusion buys.

A reference row "fp32, session opt off" times the fp32 graph with ORT's online optimisation
disabled, to show how much of the speed is ORT's own (online) optimisation.

    python benchmarks/bench_export_variants.py artifacts/runs/default-karma/checkpoint
    python benchmarks/bench_export_variants.py /tmp/smoke/runs/smol2/checkpoint --budget-s 60
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from karma.machine import machine

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# name, optimize, quantize, MatMul patterns int8 keeps fp32 (None = the export default, INT8_KEEP_FP32)
VARIANTS = (
    ("fp32", False, None, None),
    ("optimized", True, None, None),
    ("int8", False, "int8", None),
    ("optimized+int8", True, "int8", None),
    ("int8, all MatMuls", False, "int8", ()),  # what the default int8 keeps fp32 (down_proj) buys
)
REFERENCE = "fp32, session opt off"
SERVICE_BATCH = 32  # the service's default max_batch_size: users are encoded in batches of this size


# ---- inputs, built as the service builds them ---------------------------------------------------------


class Feeder:
    """Query-encoder feeds from (query texts, item-index histories): the service's own recipe."""

    def __init__(self, tokenizer: Any, features: np.ndarray, buckets: np.ndarray | None, max_q: int, max_h: int):
        self.tokenizer, self.features, self.buckets = tokenizer, features, buckets
        self.max_q, self.max_h = max_q, max_h

    def __call__(self, queries: list[str], histories: list[np.ndarray]) -> dict[str, np.ndarray]:
        from karma.featurize import query_encoder_feeds

        return query_encoder_feeds(
            self.tokenizer, self.features, queries, histories, self.max_q, self.max_h, self.buckets
        )


def _feeds_for(sessions: dict[str, Any], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {i.name for i in next(iter(sessions.values())).get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def request_batches(
    feeder: Feeder, titles: list[str], n_items: int, batch: int, history: int, count: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """`count` batches of `batch` requests: a catalog title as the query, `history` random catalog items."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        queries = [titles[int(rng.integers(len(titles)))] if titles else "" for _ in range(batch)]
        histories = [rng.integers(0, n_items, history) for _ in range(batch)]
        out.append(feeder(queries, histories))
    return out


# ---- timing ---------------------------------------------------------------------------------------------


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": float(np.median(ms)),
        "p99_ms": float(np.quantile(ms, 0.99)),
        "mean_ms": float(ms.mean()),
        "n": len(ms),
    }


def time_interleaved(
    sessions: dict[str, Any], batches: list[dict[str, np.ndarray]], requests: int, budget_s: float
) -> dict[str, dict[str, float]]:
    """Each request runs once on every session, in a rotating order; the request count fits `budget_s`."""
    names = list(sessions)
    feeds = [_feeds_for(sessions, b) for b in batches]
    round_s = 0.0
    for name in names:  # warm-up, and the time of one round
        sessions[name].run(None, feeds[0])
        start = time.perf_counter()
        sessions[name].run(None, feeds[0])
        round_s += time.perf_counter() - start
    n = int(max(20, min(requests, budget_s / max(round_s, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            sessions[name].run(None, feeds[i % len(feeds)])
            times[name].append(time.perf_counter() - start)
    return {name: _stats(t) for name, t in times.items()}


def item_throughput(
    sessions: dict[str, Any], features: np.ndarray, buckets: np.ndarray | None, repeats: int, chunk: int = 4096
) -> dict[str, dict[str, float]]:
    """Items/s over the whole catalog, each repeat interleaved across variants; median repeat."""
    from karma.contracts import ITEM_BUCKETS_INPUT, ITEM_INPUT

    def encode(session: Any) -> None:
        for start in range(0, len(features), chunk):
            feeds = {ITEM_INPUT: np.ascontiguousarray(features[start : start + chunk], dtype=np.float32)}
            if buckets is not None and len(session.get_inputs()) > 1:
                feeds[ITEM_BUCKETS_INPUT] = buckets[start : start + chunk]
            session.run(None, feeds)

    names = list(sessions)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        encode(sessions[name])  # warm-up
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            encode(sessions[name])
            times[name].append(time.perf_counter() - start)
    return {
        name: {"items_per_s": float(len(features) / np.median(t)), "catalog_s": float(np.median(t)), "repeats": len(t)}
        for name, t in times.items()
    }


def session_start(path: Path, repeats: int = 3) -> float:
    from karma.bundle import open_session

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        open_session(path)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


# ---- quality --------------------------------------------------------------------------------------------


def encode_users(session: Any, feeder: Feeder, queries: list[str], histories: list[np.ndarray], batch: int = 256):
    out = []
    for start in range(0, len(queries), batch):
        feeds = feeder(queries[start : start + batch], histories[start : start + batch])
        out.append(session.run(None, _feeds_for({"s": session}, feeds))[0])
    return np.concatenate(out).astype(np.float32)


def encode_items(session: Any, features: np.ndarray, buckets: np.ndarray | None, chunk: int = 4096) -> np.ndarray:
    from karma.contracts import ITEM_BUCKETS_INPUT, ITEM_INPUT

    out = []
    for start in range(0, len(features), chunk):
        feeds = {ITEM_INPUT: np.ascontiguousarray(features[start : start + chunk], dtype=np.float32)}
        if buckets is not None and len(session.get_inputs()) > 1:
            feeds[ITEM_BUCKETS_INPUT] = buckets[start : start + chunk]
        out.append(session.run(None, feeds)[0])
    return np.concatenate(out).astype(np.float32)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def _top(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    scores = users @ items.T
    return np.argpartition(-scores, k, axis=1)[:, :k]


def quality(users, items, ref_users, ref_items, ref_ranks, targets, cold, ks) -> dict[str, Any]:
    from training.evaluation import rank_targets, segment_metrics

    ranks = rank_targets(users, items, targets.items, targets.exclude_offsets, targets.exclude_items)
    metrics = segment_metrics(ranks, targets.items, cold, ks)
    k_flip = max(ks)
    hit, ref_hit = ranks.numpy() < k_flip, ref_ranks.numpy() < k_flip
    top, ref_top = _top(users, items, 10), _top(ref_users, ref_items, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, ref_top, strict=True)])
    h_cos, e_cos = _cos(users, ref_users), _cos(items, ref_items)
    return {
        "metrics": metrics,
        "vs_pytorch": {
            "h_cosine_min": float(h_cos.min()),
            "h_cosine_mean": float(h_cos.mean()),
            "h_max_abs_diff": float(np.abs(users - ref_users).max()),
            "item_cosine_min": float(e_cos.min()),
            "item_cosine_mean": float(e_cos.mean()),
            "top10_overlap": float(overlap),
            f"hit@{k_flip}_gained": int((hit & ~ref_hit).sum()),
            f"hit@{k_flip}_lost": int((~hit & ref_hit).sum()),
            "rank_changed_users": int((ranks != ref_ranks).sum()),
        },
    }


# ---- the benchmark --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from export.bundle_writer import export_config
    from export.onnx_export import build_served_towers, export_encoders
    from export.optimize import make_variant, variant_of
    from karma.bundle import ITEM_ENCODER_FILE, QUERY_ENCODER_FILE, open_session
    from karma.tokenization import TextTokenizer
    from training.evaluation import eval_targets, protocol_text, rank_targets, segment_metrics
    from training.setup import build_setup, embed_items, embed_users

    torch.set_num_threads(1)
    checkpoint = Path(args.checkpoint)
    config = export_config(checkpoint)
    setup = build_setup(config, checkpoint=checkpoint, device=torch.device("cpu"), progress=False)
    towers = build_served_towers(checkpoint, config, setup.features.layout.dim)
    matrix = np.ascontiguousarray(setup.features.matrix, dtype=np.float32)
    buckets = setup.features.id_buckets
    catalog = setup.dataset.catalog
    ks = sorted({*config.eval.ks, 10, 200})

    work = Path(tempfile.mkdtemp(prefix="karma-variants-"))
    fp32 = work / "fp32"
    fp32.mkdir()
    export_encoders(towers, fp32, matrix, setup.backbone.tokenizer.vocab_size)
    setup.backbone.tokenizer.save(fp32)
    tokenizer = TextTokenizer.load(fp32)  # the bundle's tokenizer, read back as the service reads it
    paths: dict[str, dict[str, Path]] = {}
    built: dict[str, Any] = {}
    for name, optimize, quantize, keep in VARIANTS:
        folder = work / name.replace("+", "_").replace(", ", "_").replace(" ", "_")
        folder.mkdir(exist_ok=True)
        variant = variant_of(optimize, quantize)
        paths[name] = {}
        for file in (QUERY_ENCODER_FILE, ITEM_ENCODER_FILE):
            start = time.perf_counter()
            made = make_variant(fp32 / file, folder / file, variant, *([] if keep is None else [keep]))
            built.setdefault(name, {})[file] = {
                "bytes": (folder / file).stat().st_size,
                "build_s": round(time.perf_counter() - start, 3),
                "session_start_ms": session_start(folder / file),
                **({"quantization": made.quantization} if made.quantization else {}),
            }
            paths[name][file] = folder / file
    print(f"graphs built in {work}", file=sys.stderr)

    q_sessions = {name: open_session(p[QUERY_ENCODER_FILE]) for name, p in paths.items()}
    i_sessions = {name: open_session(p[ITEM_ENCODER_FILE]) for name, p in paths.items()}
    feeder = Feeder(tokenizer, matrix, buckets, config.model.max_query_tokens, config.data.max_history)

    # -- quality: test split, full ranking, history excluded
    targets = eval_targets(setup.split, "test", exclude_history=True, max_users=args.max_users)
    queries = setup.batcher.query_texts(targets.positions)
    histories = [setup.split.seq_items[s:e] for s, e in zip(targets.history_start, targets.history_end, strict=True)]
    ref_users = embed_users(setup, targets.positions).numpy()
    ref_items = embed_items(setup).numpy()
    ref_ranks = rank_targets(ref_users, ref_items, targets.items, targets.exclude_offsets, targets.exclude_items)
    cold = catalog.cold
    results: dict[str, Any] = {"pytorch (reference)": {"metrics": segment_metrics(ref_ranks, targets.items, cold, ks)}}
    alone = min(targets.n_users, args.batch_dependence_users)
    for name in paths:
        users = encode_users(q_sessions[name], feeder, queries, histories, SERVICE_BATCH)
        items = encode_items(i_sessions[name], matrix, buckets)
        results[name] = quality(users, items, ref_users, ref_items, ref_ranks, targets, cold, ks)
        results[name]["files"] = built[name]
        single = encode_users(q_sessions[name], feeder, queries[:alone], histories[:alone], 1)
        batch_cos = _cos(single, users[:alone])
        results[name]["batch_dependence"] = {
            "users": alone,
            "h_cosine_batch1_vs_batch32_min": float(batch_cos.min()),
            "h_cosine_batch1_vs_pytorch_min": float(_cos(single, ref_users[:alone]).min()),
        }
    protocol = protocol_text(  # at this script's K list (config's plus 10 and 200)
        setup.dataset.name, "test", targets.n_users, ks, True, config.data.max_history, catalog.n_items
    )

    # -- speed
    titles = catalog.items[catalog.text_fields[0]].astype(str).tolist() if catalog.text_fields else []
    timed = dict(q_sessions)
    timed[REFERENCE] = open_session(paths["fp32"][QUERY_ENCODER_FILE], optimize=False)
    history = config.data.max_history
    latency = {}
    for batch, requests in ((1, args.requests), (32, args.batch_requests)):
        batches = request_batches(feeder, titles, catalog.n_items, batch, history, min(requests, 64), args.seed)
        latency[f"batch{batch}"] = time_interleaved(timed, batches, requests, args.budget_s)
        print(f"latency batch {batch} done", file=sys.stderr)
    throughput = item_throughput(i_sessions, matrix, buckets, args.item_repeats)

    return {
        "checkpoint": str(checkpoint),
        "backbone": config.model.backbone,
        "num_layers": config.model.num_layers,
        "preset": config.loss.preset,
        "n_items": catalog.n_items,
        "feature_dim": setup.features.layout.dim,
        "embed_dim": config.model.embed_dim,
        "protocol": protocol,
        "latency_protocol": (
            f"query encoder, {history} history items + a catalog title as query per request, batch 1 and 32, "
            "all variants interleaved per request (rotating order), ONNX Runtime CPU, 1 intra/1 inter-op thread, "
            "session at ORT's default online optimisation (ENABLE_ALL) except the reference row"
        ),
        "machine": machine(),
        "quality": results,
        "latency": latency,
        "item_throughput": throughput,
        "graphs_dir": str(work),
    }


# ---- report -----------------------------------------------------------------------------------------------


def table(report: dict[str, Any]) -> str:
    names = [v[0] for v in VARIANTS]
    lat, thr, q = report["latency"], report["item_throughput"], report["quality"]
    fp = {b: lat[b]["fp32"]["p50_ms"] for b in lat}
    lines = [
        f"checkpoint {report['checkpoint']} ({report['backbone']}"
        + (f", {report['num_layers']} layers" if report["num_layers"] else "")
        + f", {report['n_items']:,} items)",
        f"protocol: {report['protocol']}",
        f"latency: {report['latency_protocol']}",
        f"machine: {report['machine']['cpu']}, {report['machine']['affinity_cpus']} CPUs visible, "
        f"onnxruntime {report['machine']['onnxruntime']}",
        "",
        f"{'variant':<22}{'query MB':>9}{'item MB':>8}{'start ms':>9}"
        f"{'b1 p50':>9}{'b1 p99':>9}{'b1 x':>6}{'b32 p50':>9}{'b32 p99':>9}{'b32 x':>6}"
        f"{'items/s':>10}{'HR@200':>8}{'NDCG@10':>8}{'cos h min':>10}{'top10 ov':>9}{'hit@200 +/-':>12}"
        f"{'b1~b32':>8}",
    ]
    ref = q["pytorch (reference)"]["metrics"]["all"]
    lines.append(f"{'pytorch (reference)':<22}{'':>9}{'':>8}{'':>9}{'':>9}{'':>9}{'':>6}{'':>9}{'':>9}{'':>6}{'':>10}"
                 f"{ref['HR@200']:>8.4f}{ref['NDCG@10']:>8.4f}")  # fmt: skip
    for name in [*names, REFERENCE]:
        b1, b32 = lat["batch1"][name], lat["batch32"][name]
        row = f"{name:<22}"
        if name in q:
            files = q[name]["files"]
            start = files["query_encoder.onnx"]["session_start_ms"]
            mb = {k: v["bytes"] / 1e6 for k, v in files.items()}
            row += f"{mb['query_encoder.onnx']:>9.2f}{mb['item_encoder.onnx']:>8.2f}"
            row += f"{start:>9.1f}"
        else:
            row += f"{'':>9}{'':>8}{'':>9}"
        row += f"{b1['p50_ms']:>9.3f}{b1['p99_ms']:>9.3f}{fp['batch1'] / b1['p50_ms']:>6.2f}"
        row += f"{b32['p50_ms']:>9.2f}{b32['p99_ms']:>9.2f}{fp['batch32'] / b32['p50_ms']:>6.2f}"
        if name in q:
            m, v = q[name]["metrics"]["all"], q[name]["vs_pytorch"]
            row += f"{thr[name]['items_per_s']:>10,.0f}{m['HR@200']:>8.4f}{m['NDCG@10']:>8.4f}"
            row += f"{v['h_cosine_min']:>10.5f}{v['top10_overlap']:>9.3f}"
            row += f"{'+' + str(v['hit@200_gained']) + '/-' + str(v['hit@200_lost']):>12}"
            row += f"{q[name]['batch_dependence']['h_cosine_batch1_vs_batch32_min']:>8.4f}"
        lines.append(row)
    n1, n32 = lat["batch1"]["fp32"]["n"], lat["batch32"]["fp32"]["n"]
    lines += [
        "",
        f"x = fp32 p50 / variant p50 (speed-up); {n1} batch-1 and {n32} batch-32 requests per variant; "
        "start ms = opening the query session (median of 3); hit@200 +/- = users whose target enters/leaves "
        "the top 200 vs PyTorch; cos h min / top10 ov vs PyTorch (users encoded in batches of 32, as the "
        "service batches); b1~b32 = min cosine of a user's h encoded alone vs in its batch of 32.",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v[0] for v in VARIANTS]
    lat, thr, q = report["latency"], report["item_throughput"], report["quality"]
    colors = ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#dd8452"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))

    def timing(batch: str, key: str) -> list[float]:
        return [lat[batch][n][key] for n in names]

    panels = [
        ("query p50 ms, batch 1", timing("batch1", "p50_ms"), timing("batch1", "p99_ms")),
        ("query p50 ms, batch 32", timing("batch32", "p50_ms"), timing("batch32", "p99_ms")),
        ("item encoder, items/s", [thr[n]["items_per_s"] for n in names], None),
        ("HR@200 (test, full ranking)", [q[n]["metrics"]["all"]["HR@200"] for n in names], None),
    ]
    for ax, (title, values, p99) in zip(axes, panels, strict=True):
        bars = ax.bar(range(len(names)), values, color=colors)
        if p99 is not None:
            ax.scatter(range(len(names)), p99, marker="_", s=300, color="black", label="p99", zorder=3)
            ax.legend(loc="lower right", fontsize=8)
        for bar, value in zip(bars, values, strict=True):
            label = f"{value:.4f}" if value < 1 else f"{value:,.3g}" if value < 1000 else f"{value:,.0f}"
            top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
            ax.annotate(label, top, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
    ref = q["pytorch (reference)"]["metrics"]["all"]["HR@200"]
    axes[3].axhline(ref, color="black", linestyle=":", linewidth=1, label=f"PyTorch {ref:.4f}")
    axes[3].legend(loc="lower right", fontsize=8)
    hr = [q[n]["metrics"]["all"]["HR@200"] for n in names]
    axes[3].set_ylim(max(0.0, min(hr) - 0.05), min(1.0, max(hr) + 0.03))
    m = report["machine"]
    fig.suptitle(
        f"{Path(report['checkpoint']).parent.name} ({report['backbone']}, {report['n_items']:,} items): "
        f"ONNX Runtime {m['versions'].get('onnxruntime')} CPU, 1 thread, {m['cpu']} ({m['cores']} CPUs)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a run's checkpoint folder")
    parser.add_argument("--out", type=Path, help="JSON path (default artifacts/benchmarks/export_variants_<run>.json)")
    parser.add_argument("--requests", type=int, default=400, help="batch-1 requests per variant (at most)")
    parser.add_argument("--batch-requests", type=int, default=100, help="batch-32 requests per variant (at most)")
    parser.add_argument("--budget-s", type=float, default=90.0, help="seconds per latency measurement (caps requests)")
    parser.add_argument("--item-repeats", type=int, default=5, help="timed passes over the catalog per variant")
    parser.add_argument("--max-users", type=int, default=None, help="evaluate the first N test users only")
    parser.add_argument(
        "--batch-dependence-users", type=int, default=256, help="users also encoded alone (batch 1) to compare"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-graphs", action="store_true", help="keep the variant ONNX files (temp folder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    report = run(args)
    if not args.keep_graphs:
        shutil.rmtree(report.pop("graphs_dir"), ignore_errors=True)
    run_name = Path(args.checkpoint).resolve().parent.name
    out = args.out or REPO_ROOT / "artifacts" / "benchmarks" / f"export_variants_{run_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))
    plot(report, out.with_suffix(".png"))
    print(table(report))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
