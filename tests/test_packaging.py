"""The promises around the code: two README commands, CI calling the same one, Dockerfile in step with ./run."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

from tests.conftest import KARMA_BIN, REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_readme_first_screen_has_the_two_commands() -> None:
    first_screen = (REPO / "README.md").read_text().splitlines()[:25]
    commands = [line.strip().split("#")[0].strip() for line in first_screen if line.strip().startswith("./run ")]
    assert commands == ["./run demo", "./run test"]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^exec \./run test\b", ci, re.MULTILINE)


def test_torch_pin_admits_the_local_cpu_wheel() -> None:
    torch_req = next(r for r in PYPROJECT["project"]["optional-dependencies"]["train"] if r.startswith("torch"))
    spec = SpecifierSet(torch_req.removeprefix("torch"))
    assert "2.13.0" in spec
    assert "2.15.0" not in spec, "a range open above lets pip pick a newer (CUDA) torch"
    assert "TORCH_VERSION=2.13.0" in (REPO / "run").read_text()


def test_dockerfile_installs_with_the_same_script() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    runs = re.findall(r"^RUN (.+)$", dockerfile, re.MULTILINE)
    assert "./run setup" in runs
    extras = re.search(r"KARMA_EXTRAS=(\S+)", dockerfile).group(1).split(",")
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])
    assert "train" not in extras, "the serving image must stay torch-free"
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, re.MULTILINE))
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"packages not copied into the image: {packages - copied}"
    run_script = (REPO / "run").read_text()
    build_stage = dockerfile.split("FROM python:3.11-slim AS runtime")[0]
    env_lines = " ".join(re.findall(r"^ENV (.+)$", build_stage, re.MULTILINE))
    assert "KARMA_EXTRAS=" in env_lines
    for knob in re.findall(r"(KARMA_[A-Z_]+)=", env_lines):
        assert f"${{{knob}:-" in run_script, f"{knob} is set in the Dockerfile but ./run ignores it"


def test_karma_shared_package_does_not_import_torch() -> None:
    code = "import sys, karma.config, karma.contracts, karma.errors, karma.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([str(Path(KARMA_BIN).with_name("python")), "-c", code]).returncode == 0


def test_unimplemented_commands_say_so_in_one_line() -> None:
    result = subprocess.run([KARMA_BIN, "bench"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: 'karma bench' is not implemented yet (tracked in issue 6)"
