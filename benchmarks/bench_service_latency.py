"""`/search` latency at low load: p50/p99 per stage over a 100k-item bundle, served by `karma serve`.

    python benchmarks/bench_service_latency.py                      # builds the bundle (~40 s), 1000 requests
    python benchmarks/bench_service_latency.py --bundle DIR --requests 2000

The bundle (unless --bundle): the default tiny backbone trained briefly on a 100k-item synthetic
catalog (BUNDLE_OVERRIDES below). The server runs as configured by default (access log on, 1 ORT
thread, micro-batching on). Before timing, USERS users get histories through `POST /events`
(1..max_history clicks on Zipf-popular items), so searches read real histories from Redis.
Then REQUESTS sequential `POST /search {user_id, query, k}` calls (one at a time: low load) over
one keep-alive connection (a raw HTTP/1.1 client by default, see RawClient; `--client httpx`).

Reported per stage, from the response's `timings_ms` (history, featurize, queue, encode, search,
total) plus `client` (wall time seen by the client, HTTP included): p50, p90, p99, mean. `overhead`
is total - encode - search per request; `overhead_share_p50` is the median of overhead / total
(target < 0.30). JSON goes to --out, a latency histogram PNG beside it.

The Redis parser and event loop matter here: with hiredis, uvloop and httptools installed (the
`redis[hiredis]` and `uvicorn[standard]` extras) history reads and loop hand-offs are ~0.1 ms
faster per search; the JSON records which of them were present.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

from bench.harness import REPO, build_bundle, karma_serve, log_steps_to_stderr
from bench.stages import STAGES, RawClient, summarize_stages, time_requests

BUNDLE_OVERRIDES = [
    "data.synthetic.n_items=100000",
    "data.synthetic.n_users=20000",
    "data.synthetic.n_events=300000",
    "features.text_encoder=hashing",
    "features.threads=1",
    "train.threads=1",
    "train.steps=50",
    "train.checkpoint_every=1000000",
    "eval.max_users=200",
]
OPTIONAL = ("hiredis", "uvloop", "httptools")


def seed_histories(client: httpx.Client, items: list[str], users: int, max_history: int, rng: random.Random) -> None:
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(len(items))]
    for u in range(users):
        clicks = rng.choices(items, weights=weights, k=rng.randint(1, max_history))
        for n, item in enumerate(clicks):
            r = client.post("/events", json={"user_id": f"bench-u{u}", "item_id": item, "timestamp": 1.7e9 + n})
            r.raise_for_status()


class HttpxPoster:
    """`--client httpx`: the same `.post(path, payload) -> (status, json)` as RawClient."""

    def __init__(self, client: httpx.Client):
        self.client = client

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        r = self.client.post(path, json=payload)
        return r.status_code, r.json()


def measure(client: RawClient | HttpxPoster, queries: list[str], users: int, n: int, rng: random.Random) -> list[dict]:
    bodies = [{"user_id": f"bench-u{rng.randrange(users)}", "query": rng.choice(queries), "k": 10} for _ in range(n)]
    return time_requests(client, bodies, n)


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    top = np.percentile([r["client"] for r in rows], 99.5)
    bins = np.linspace(0, top, 80)
    for key, color in (("client", "tab:gray"), ("total", "tab:blue")):
        values = [r[key] for r in rows]
        left.hist(values, bins=bins, alpha=0.6, color=color, label=f"{key} (p50 {np.median(values):.2f} ms)")
        left.axvline(np.percentile(values, 99), color=color, linestyle="--", linewidth=1)
    left.set(xlabel="ms", ylabel="requests", title="/search latency (dashed: p99)")
    left.legend()
    stages = ("history", "featurize", "queue", "encode", "search")
    p50 = [summary["stages_ms"][s]["p50"] for s in stages]
    p99 = [summary["stages_ms"][s]["p99"] for s in stages]
    x = np.arange(len(stages))
    right.bar(x - 0.2, p50, 0.4, label="p50")
    right.bar(x + 0.2, p99, 0.4, label="p99")
    right.set_xticks(x, stages)
    right.set(ylabel="ms", title=f"per stage; outside encode+search at p50: {summary['overhead_share_p50']:.0%}")
    right.legend()
    fig.suptitle(f"{summary['n_items']:,} items, {summary['requests']} sequential requests, {summary['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    log_steps_to_stderr()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="Serve this bundle instead of building the 100k-item one.")
    parser.add_argument("--workdir", type=Path, help="Build the bundle here and keep it (default: a temp folder).")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--users", type=int, default=200, help="Users given a history through /events first.")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw", help="See RawClient.")
    parser.add_argument("--redis-url", default=os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--set", dest="sets", action="append", default=[], help="serve.* override for the server.")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts/benchmarks/service_latency.json")
    args = parser.parse_args()

    from karma.bundle import load_bundle

    with tempfile.TemporaryDirectory(prefix="karma-latency-") as tmp:
        bundle_dir = args.bundle or build_bundle(args.workdir or Path(tmp), BUNDLE_OVERRIDES)
        bundle = load_bundle(bundle_dir, verify_checksums=False, check_graphs=False, with_index=False)
        items = bundle.items["item_id"].astype(str).tolist()
        queries = [" ".join(t.split()[:4]) for t in bundle.items["title"].astype(str).tolist()[:5000]]
        max_history = bundle.manifest.max_history
        rng = random.Random(0)
        with (
            karma_serve(bundle_dir, args.redis_url, sets=args.sets) as (base, _prefix),
            httpx.Client(base_url=base, timeout=30) as client,
        ):
            seed_histories(client, items, args.users, max_history, rng)
            searcher = RawClient(base) if args.client == "raw" else HttpxPoster(client)
            measure(searcher, queries, args.users, args.warmup, rng)
            rows = measure(searcher, queries, args.users, args.requests, rng)
            info = client.get("/info").json()
            if isinstance(searcher, RawClient):
                searcher.close()

    measured = summarize_stages(rows)
    stages = measured["stages_ms"]
    summary = {
        "machine": f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
        # Optional speed-ups the server picks up when installed (redis[hiredis], uvicorn[standard]).
        "optional_packages": {name: importlib.util.find_spec(name) is not None for name in OPTIONAL},
        "bundle": str(args.bundle) if args.bundle else "built: " + " ".join(BUNDLE_OVERRIDES),
        "n_items": info["n_items"],
        "model_version": info["model_version"],
        "dims": info["dims"],
        "max_history": max_history,
        "index": info["index"]["type"],
        "client": args.client,
        **measured,
        "overhead_share_of_p50s": round(
            (stages["total"]["p50"] - stages["encode"]["p50"] - stages["search"]["p50"]) / stages["total"]["p50"], 4
        ),
        "target_share": 0.30,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    plot(rows, summary, args.out.with_suffix(".png"))
    print(f"{'stage':<10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for s in STAGES:
        st = stages[s]
        print(f"{s:<10} {st['p50']:>8.3f} {st['p90']:>8.3f} {st['p99']:>8.3f} {st['mean']:>8.3f}")
    print(f"outside encode+search at p50: {summary['overhead_share_p50']:.1%} (target < 30%)")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
