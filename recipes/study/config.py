"""What a study is: one YAML file (`studies/*.yaml`) naming the presets, seeds, budget and baselines.

A study trains every preset with the same backbone, data, budget and seeds, so the only
difference between two rows of its table is the loss. The file is validated like the main config:
an unknown key or an override that `karma.config` rejects is an error naming it, before anything
trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from karma.config import KarmaConfig, StrictModel, load_config
from karma.errors import ConfigError

Preset = Literal["action-only", "gen", "recon", "karma-text", "karma", "img-mse"]
Baseline = Literal["popular", "content", "sasrec"]
REFERENCE_PRESET = "action-only"
SASREC_CPU = "sasrec-cpu"  # the SASRec baseline under the training-CPU budget of `sasrec_cpu_match`
WARMUP_REFERENCE = "warmup-only"


class StudyConfig(StrictModel):
    """One ablation study: every (preset, seed) run shares `overrides`; only loss.preset and seed vary."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Folder-safe study name.")
    title: str = Field("", description="One line for the report's heading.")
    profile: Path | None = Field(
        None,
        description="A config file every run starts from, under `overrides` (relative to the study file, else to "
        "the working folder), e.g. configs/tiny.yaml.",
    )
    overrides: list[str] = Field(
        default_factory=list, description="KEY=VALUE config overrides shared by every run (data, backbone, budget)."
    )
    presets: list[Preset] = Field(
        ["action-only", "recon", "karma", "gen", "karma-text", "img-mse"], min_length=1, description="Loss presets."
    )
    headline: list[Preset] = Field(
        ["action-only", "recon", "karma"], description="Presets trained with every seed; the rest use the first."
    )
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="Seeds of the headline presets (first = all).")
    baselines: list[Baseline] = Field(["popular", "content", "sasrec"], description="Reference models.")
    sasrec: dict[str, Any] = Field(
        default_factory=dict, description="SASRecConfig fields for the SASRec baseline (seeded with the first seed)."
    )
    sasrec_cpu_match: Preset | None = Field(
        None,
        description=(
            "Also train SASRec (baseline `sasrec-cpu`, the `sasrec` settings otherwise) with a training-CPU budget "
            "equal to the training-loop CPU seconds of this preset's first-seed run, so the two stand side by side "
            "at equal compute. SASRec stops after the epoch that reaches the budget, so it may overshoot by one epoch; "
            "the report gives both CPU figures."
        ),
    )
    diagnose_users: int = Field(256, ge=2, description="Test users for the collapse diagnostics of every run.")
    export: bool = Field(True, description="Export every run to a bundle (parity-checked) and compare served graphs.")
    compare_requests: int = Field(200, ge=10, description="Interleaved requests of the action-only vs karma timing.")
    hr_curve_max_k: int = Field(200, ge=1, description="Largest K of the HR@K curve figure.")
    warmup_reference: bool = Field(
        True,
        description=(
            "Also diagnose the model as the action stage finds it (semantic warm-up + 1 action step, first "
            "seed): attention patterns already there (e.g. the pretrained LLM's own sink) are not collapse."
        ),
    )
    artifacts: Path | None = Field(None, description="Runs, caches, bundles (default artifacts/studies/<name>).")
    report_dir: Path | None = Field(None, description="RESULTS.md, results.json, PNGs (default docs/results/<name>).")

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        if REFERENCE_PRESET not in self.presets:
            raise ValueError(f"presets must include {REFERENCE_PRESET!r}: every delta is measured against it")
        missing = [p for p in self.headline if p not in self.presets]
        if missing:
            raise ValueError(f"headline presets {missing} are not in presets")
        if self.sasrec_cpu_match is not None and self.sasrec_cpu_match not in self.presets:
            raise ValueError(f"sasrec_cpu_match {self.sasrec_cpu_match!r} is not in presets")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.presets)) != len(self.presets):
            raise ValueError("seeds and presets must not repeat")
        return self

    @property
    def artifacts_dir(self) -> Path:
        return self.artifacts or Path("artifacts") / "studies" / self.name

    @property
    def report_path(self) -> Path:
        return self.report_dir or Path("docs") / "results" / self.name

    def seeds_of(self, preset: str) -> list[int]:
        return list(self.seeds) if preset in self.headline else [self.seeds[0]]

    def run_name(self, preset: str, seed: int) -> str:
        return f"{preset}-s{seed}"

    def plan(self) -> list[tuple[str, int]]:
        """(preset, seed) in training order: every headline preset seed by seed, then the others.

        Headline means with spread exist as early as possible; a study stopped half-way still
        reports every finished run.
        """
        order = [(p, s) for s in self.seeds for p in self.presets if p in self.headline]
        return order + [(p, self.seeds[0]) for p in self.presets if p not in self.headline]

    @property
    def reference_run_name(self) -> str:
        return f"{WARMUP_REFERENCE}-s{self.seeds[0]}"

    def reference_config(self, extra: Sequence[str] = ()) -> KarmaConfig:
        """The warm-up reference: the action-only recipe stopped after one action step."""
        config = self.run_config(REFERENCE_PRESET, self.seeds[0], [*extra, "train.steps=1"])
        config.train.run_name = self.reference_run_name
        return config

    def run_config(self, preset: str, seed: int, extra: Sequence[str] = ()) -> KarmaConfig:
        """The exact KarmaConfig of one run (the process environment is ignored: a study is reproducible)."""
        overrides = [
            *self.overrides,
            *extra,
            f"paths.artifacts={self.artifacts_dir}",
            f"loss.preset={preset}",
            f"seed={seed}",
            f"train.run_name={self.run_name(preset, seed)}",
        ]
        return load_config(self.profile, overrides, environ={})


def load_study(path: Path | str) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path}: not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"study file {path}: cannot parse: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"study file {path}: top level must be a mapping")
    try:
        study = StudyConfig.model_validate(raw)
        if study.profile is not None and not study.profile.is_absolute():
            beside = (path.parent / study.profile).resolve()  # relative to the study file, else to the working folder
            study.profile = beside if beside.is_file() else study.profile.resolve()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'study'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"study file {path}: {problems}") from None
    study.run_config(study.presets[0], study.seeds[0])  # a bad override fails here, naming itself
    from training.baselines_config import SASRecConfig

    try:
        SASRecConfig(**study.sasrec)
    except TypeError as exc:
        raise ConfigError(f"study file {path}: sasrec: {exc}") from None
    return study
