"""Benchmark the synthetic data generator: wall time, peak memory and events per second.

The generator runs in a fresh child process so that its peak RSS is not inflated by whatever the
parent did before; the child reports its RSS after imports (the baseline) and after generating.

    python benchmarks/bench_synthetic.py                                # 100k items, 1M events
    python benchmarks/bench_synthetic.py --items 1000000 --events 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from karma.machine import machine, machine_line

REPO_ROOT = Path(__file__).resolve().parents[1]


def _maxrss_mib() -> float:
    """Peak RSS of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def run_child(items: int, users: int, events: int, seed: int) -> dict[str, Any]:
    """Generate once in this process and return the measurements (called inside the child)."""
    sys.path.insert(0, str(REPO_ROOT))
    from karma.config import SyntheticConfig
    from training.data.synthetic import generate_synthetic

    cfg = SyntheticConfig(n_items=items, n_users=users, n_events=events, seed=seed)
    baseline = _maxrss_mib()
    start = time.perf_counter()
    ds = generate_synthetic(cfg, progress=False)
    wall = time.perf_counter() - start
    peak = _maxrss_mib()
    n_events = ds.interactions.n_events
    return {
        "config": cfg.model_dump(mode="json"),
        "wall_s": round(wall, 3),
        "events": n_events,
        "events_per_s": round(n_events / wall, 1),
        "items_per_s": round(items / wall, 1),
        "baseline_rss_mib": round(baseline, 1),
        "peak_rss_mib": round(peak, 1),
        "peak_rss_increase_mib": round(peak - baseline, 1),
        "stats": ds.meta["stats"],
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the generator in a fresh interpreter and parse its one-line JSON report."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        f"--items={args.items}",
        f"--users={args.users}",
        f"--events={args.events}",
        f"--seed={args.seed}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"generator child failed with status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def show(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = result["config"]
    table = Table(title="synthetic generator")
    for column in ("items", "users", "events", "wall s", "events/s", "peak MiB", "+MiB"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{cfg['n_items']:,}",
        f"{cfg['n_users']:,}",
        f"{result['events']:,}",
        f"{result['wall_s']:.2f}",
        f"{result['events_per_s']:,.0f}",
        f"{result['peak_rss_mib']:,.0f}",
        f"{result['peak_rss_increase_mib']:,.0f}",
    )
    Console().print(table)
    m = result["machine"]
    Console().print(f"machine: {machine_line(m)}, {m['os']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("artifacts/benchmarks/synthetic_generator.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.items, args.users, args.events, args.seed)))
        return
    result = {"benchmark": "synthetic_generator", **measure(args), "machine": machine()}
    show(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
