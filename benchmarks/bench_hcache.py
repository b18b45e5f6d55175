"""What the h_t cache buys under the locust scenario's traffic: hit rate and latency, cache off vs on.

    python benchmarks/bench_hcache.py [--bundle artifacts/bundles/default] [--seconds 60] [--users 20]
        [--locust locust] [--entries 100000] [--set serve.KEY=VALUE ...]

Starts `karma serve` on the bundle twice (serve.h_cache_entries = 0, then --entries), each time runs
`loadtest/search.py` headless against it (the same Zipf users, clicks, by-user and by-history
searches, seeds and wait times; `--locust` is the locust executable, e.g. from a venv of its own:
locust is never installed beside the service), then reads the cache's counters from /info and
locust's per-endpoint latency percentiles from its CSV. Prints a table and writes
artifacts/benchmarks/h_cache.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench.report import save_report
from karma.machine import machine
from service.launcher import karma_serve


def run_locust(locust: str, base: str, seconds: int, users: int, bundle: Path, out: Path) -> dict[str, Any]:
    env = {**os.environ, "KARMA_LOADTEST_BUNDLE": str(bundle), "KARMA_LOADTEST_SEED": "0"}
    command = [locust, "-f", "loadtest/search.py", "--host", base, "--headless", "-u", str(users), "-r", str(users),
               "-t", f"{seconds}s", "--csv", str(out / "run"), "--only-summary"]  # fmt: skip
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if not (out / "run_stats.csv").is_file():
        raise SystemExit(f"locust failed ({done.returncode}): {done.stderr[-2000:]}")
    # locust exits non-zero when any request failed: the failures are in the table
    rows = {}
    with (out / "run_stats.csv").open() as handle:
        for row in csv.DictReader(handle):
            rows[row["Name"]] = {
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "p50_ms": float(row["50%"]),
                "p99_ms": float(row["99%"]),
                "rps": round(float(row["Requests/s"]), 1),
            }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/bundles/default"))
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--locust", default="locust")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=Path("artifacts/benchmarks/h_cache.json"))
    parser.add_argument("--set", dest="sets", action="append", default=[], help="serve.* override for both runs.")
    args = parser.parse_args()
    report: dict[str, Any] = {"bundle": str(args.bundle), "seconds": args.seconds, "users": args.users,
                              "sets": args.sets, "machine": machine(), "runs": {}}  # fmt: skip
    for entries in (0, args.entries):
        sets = [*args.sets, f"serve.h_cache_entries={entries}"]
        with karma_serve(args.bundle, args.redis_url, sets=sets) as (base, _):
            with tempfile.TemporaryDirectory(prefix="karma-locust-") as tmp:
                stats = run_locust(args.locust, base, args.seconds, args.users, args.bundle, Path(tmp))
            info = httpx.get(f"{base}/info", timeout=10).json()
        report["runs"][str(entries)] = {"locust": stats, "h_cache": info.get("h_cache")}
        print(f"h_cache_entries={entries}: {json.dumps(info.get('h_cache'))}")
        for name, row in stats.items():
            print(f"  {name:<22} {row}")
    save_report(report, args.out)


if __name__ == "__main__":
    main()
