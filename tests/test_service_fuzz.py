"""Schemathesis against a real `karma serve` (uvicorn, ONNX Runtime, FAISS, Redis) from its live OpenAPI schema.

    python -m pytest tests/test_service_fuzz.py                      # 25 examples per operation (~30 s)
    FUZZ_EXAMPLES=1000 FUZZ_SEED=7 python -m pytest tests/test_service_fuzz.py -s   # a long run, output shown

`--checks all` with `positive_data_acceptance` swapped for `tests/fuzz_checks.py`'s stateful version
(a schema-valid request may be refused only for server state: unknown catalog items, a user without
history, a bad bundle path, the body-size limit, an unsupported dimension). With the admin key,
`/admin/reload` is fuzzed too. Afterwards the server's own metrics must count zero 5xx responses.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.launcher import karma_serve
from tests.helpers import REDIS_URL, REPO, needs_redis

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
HOOKS = Path(__file__).with_name("fuzz_checks.py")


def server_5xx(base: str) -> int:
    """5xx responses the server counted itself (karma_request_duration_seconds_count{status=5..})."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "karma_request_duration_seconds_count" and sample.labels["status"].startswith("5"):
                total += sample.value
    return int(total)


@needs_redis
def test_schemathesis_finds_no_failure_and_no_server_error(tiny_export: tuple[Path, Path], tmp_path: Path) -> None:
    key = secrets.token_hex(16)
    env = {"KARMA_SERVE__ADMIN_API_KEY": key, "KARMA_SERVE__ACCESS_LOG": "false"}
    examples, seed = os.environ.get("FUZZ_EXAMPLES", "25"), os.environ.get("FUZZ_SEED", "0")
    with karma_serve(tiny_export[1], REDIS_URL, env=env, cwd=REPO) as (base, _prefix):
        command = [
            SCHEMATHESIS, "run", f"{base}/openapi.json",
            "--checks", "all", "--exclude-checks", "positive_data_acceptance",
            "-H", f"Authorization: Bearer {key}",
            "--max-examples", examples, "--seed", seed, "--workers", "1", "--no-color",
        ]  # fmt: skip
        run_env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
        result = subprocess.run(command, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=1800)
        fives = server_5xx(base)
    summary = re.search(r"(\d+) generated, (.*?)(?:\n|$)", result.stdout)
    print(result.stdout[-4000:])
    assert summary is not None and int(summary.group(1)) > 100, result.stdout[-3000:]  # it really fuzzed
    tested = re.search(r"Tested: (\d+)", result.stdout)
    assert tested is not None and int(tested.group(1)) >= 12  # every operation of the schema, new routes included
    assert result.returncode == 0, result.stdout[-6000:]
    assert fives == 0
