"""Fuzz the search service's OpenAPI schema with schemathesis against a real `karma serve` (uvicorn).

    python benchmarks/fuzz_service.py                        # builds a tiny bundle (~10 s), 200 examples/op
    python benchmarks/fuzz_service.py --bundle DIR --max-examples 1000 --seed 3

Steps: train + export a tiny bundle with the CLI into a temporary folder (unless --bundle), start
`karma serve` on a free port with its own Redis key prefix and a random admin key, then run

    schemathesis run http://127.0.0.1:PORT/openapi.json --checks all \\
        --exclude-checks positive_data_acceptance -H 'Authorization: Bearer <key>' \\
        --max-examples N --seed S --workers 1          (with SCHEMATHESIS_HOOKS=benchmarks/fuzz_checks.py)

`positive_data_acceptance` is swapped for the hook's `positive_data_acceptance_stateful`, which
allows a schema-valid request to be refused only for server state (unknown catalog items, a user
without history, a bad bundle path for /admin/reload, the body-size limit); see fuzz_checks.py.
With the admin key, /admin/reload is fuzzed too (most generated paths are refused with 422
`invalid_bundle`, which schemathesis reports as a warning; an empty body reloads the served bundle).

Afterwards the server's own metrics must show zero 5xx responses. The summary (cases, failures,
5xx) is printed as JSON and written to --out; exit status 1 on any failure or 5xx.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from service_harness import REPO, SMALL_DATA, TINY, build_bundle, karma_serve

HERE = Path(__file__).resolve().parent
SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))


def server_5xx(base: str) -> int:
    """5xx responses the server counted itself (karma_request_duration_seconds_count{status=5..})."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "karma_request_duration_seconds_count" and s.labels.get("status", "").startswith("5"):
                total += s.value
    return int(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="Serve this bundle instead of building a tiny one.")
    parser.add_argument("--redis-url", default=os.environ.get("KARMA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--max-examples", type=int, default=200, help="Schemathesis examples per operation.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "artifacts/benchmarks/fuzz_service.json")
    parser.add_argument("extra", nargs="*", help="More schemathesis arguments (after --).")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="karma-fuzz-") as tmp:
        bundle = args.bundle or build_bundle(Path(tmp), [*TINY, *SMALL_DATA])
        key = secrets.token_hex(16)
        env = {"KARMA_SERVE__ADMIN_API_KEY": key, "KARMA_SERVE__ACCESS_LOG": "false"}
        with karma_serve(bundle, args.redis_url, env=env) as (base, _prefix):
            command = [
                SCHEMATHESIS, "run", f"{base}/openapi.json",
                "--checks", "all", "--exclude-checks", "positive_data_acceptance",
                "-H", f"Authorization: Bearer {key}",
                "--max-examples", str(args.max_examples), "--seed", str(args.seed), "--workers", "1",
                "--no-color", *args.extra,
            ]  # fmt: skip
            shown = shlex.join(command).replace(key, "<key>").replace(SCHEMATHESIS, "schemathesis")
            print(f"SCHEMATHESIS_HOOKS=benchmarks/fuzz_checks.py {shown}", file=sys.stderr)
            started = time.perf_counter()
            run_env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HERE / "fuzz_checks.py")}
            result = subprocess.run(command, cwd=tmp, env=run_env, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            print(result.stdout[-6000:], result.stderr[-2000:], sep="\n", file=sys.stderr)
            fives = server_5xx(base)

    counts = re.search(r"(\d+) generated, (.*?)(?:\n|$)", result.stdout)
    summary = {
        "command": f"SCHEMATHESIS_HOOKS=benchmarks/fuzz_checks.py {shown}",
        "schemathesis_exit": result.returncode,
        "cases_generated": int(counts.group(1)) if counts else None,
        "outcome": counts.group(2).strip() if counts else None,
        "server_5xx": fives,
        "seconds": round(seconds, 1),
        "bundle": str(args.bundle) if args.bundle else "tiny (built for this run)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    sys.exit(0 if result.returncode == 0 and fives == 0 else 1)


if __name__ == "__main__":
    main()
