"""The generated references in docs/ match the code they are generated from.

docs/CONFIG.md is `karma config reference` (karma/config.py) and docs/METRICS.md is
`python -m service.metrics` (service/metrics.py). When a field or metric changes, regenerate with the
command named in the failure.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from karma.config import SECRET_KEYS, KarmaConfig, config_reference, env_var_name, load_config
from service.metrics import metric_specs, metrics_reference
from tests.helpers import KARMA_BIN, REPO

DOCS = REPO / "docs"


def leaf_keys(model: type = KarmaConfig, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            keys += leaf_keys(annotation, (*prefix, name))
        else:
            keys.append((*prefix, name))
    return keys


@pytest.mark.parametrize(
    ("path", "generated", "command"),
    [
        ("CONFIG.md", config_reference, "karma config reference > docs/CONFIG.md"),
        ("METRICS.md", metrics_reference, "python -m service.metrics > docs/METRICS.md"),
    ],
)
def test_checked_in_reference_is_up_to_date(path: str, generated, command: str) -> None:
    assert (DOCS / path).read_text(encoding="utf-8") == generated(), f"docs/{path} is stale: run `{command}`"


def test_config_reference_lists_every_key_once_with_a_working_env_var() -> None:
    text = config_reference()
    rows = re.findall(r"^\| `([\w.]+)` \| `(KARMA_\w+)` \|", text, re.MULTILINE)
    assert [tuple(key.split(".")) for key, _ in rows] == leaf_keys()
    defaults = load_config(environ={})
    for key, env in rows:
        parts = key.split(".")
        assert env == env_var_name(parts)
        if tuple(parts) in SECRET_KEYS:  # secrets are read verbatim (never YAML-parsed): no JSON round trip
            continue
        value = defaults.model_dump(mode="json")
        for part in parts:
            value = value[part]
        # The variable the table names is one load_config accepts: its default, as JSON (= YAML), round-trips.
        assert load_config(environ={env: json.dumps(value)}) == defaults, env


def test_config_reference_command_prints_it() -> None:
    result = subprocess.run([KARMA_BIN, "config", "reference"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == config_reference()


def test_metrics_reference_lists_every_metric_with_its_buckets() -> None:
    text = metrics_reference()
    specs = metric_specs()
    assert len(specs) >= 10
    for spec in specs:
        assert re.search(rf"^\| `{spec.name}` \| {spec.kind} \|", text, re.MULTILINE), spec.name
        for label in spec.labels:
            assert f"`{label}`" in text
        if spec.kind == "histogram":
            assert f"- `{spec.name}` ({len(spec.buckets)} + `+Inf`)" in text
    stage = next(s for s in specs if s.name == "karma_stage_duration_seconds")
    assert stage.buckets[0] == 50e-6 and stage.buckets[-1] == 10.0
    assert "50 µs, 75 µs" in text and "7.5 s, 10 s" in text
