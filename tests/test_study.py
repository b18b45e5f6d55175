"""`karma study`: every preset x seed trained, evaluated, diagnosed, exported and reported; runs reused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from karma.errors import ConfigError, KarmaError
from recipes.study import build_report, load_study, rediagnose, run_study
from recipes.study.aggregate import hr_curve, paired_deltas, spread
from recipes.study.runs import RANKS_FILE, RUN_RESULT, execute_run, same_signature, signature
from tests.helpers import KARMA_BIN, REPO
from training.evaluation.metrics import metrics_from_ranks

SMOKE = REPO / "studies" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory):
    """The smoke study (tiny backbone; 2 action-only seeds + 1 recon run + 3 baselines), run once."""
    tmp = tmp_path_factory.mktemp("study")
    study = load_study(SMOKE).model_copy(update={"artifacts": tmp / "artifacts", "report_dir": tmp / "report"})
    results = run_study(study, progress=False)
    return study, results


def test_every_run_and_baseline_is_reported(smoke) -> None:
    study, results = smoke
    assert results["status"] == {"planned": 3, "finished": 3, "missing": []}
    assert set(results["runs"]) == {"action-only-s0", "action-only-s1", "recon-s0"}
    reference = results["warmup_reference"]  # the model as the action stage found it: 1 action step
    assert reference["run"] == "warmup-only-s0" and reference["trained_step"] == 2 + 1
    assert set(results["baselines"]) == {"popular", "content", "sasrec", "sasrec-cpu"}
    report = (study.report_path / "RESULTS.md").read_text()
    # Every model gets a 95% interval per metric; the seed-paired delta table keeps mean ± std over seeds.
    action = next(line for line in report.splitlines() if line.startswith("| `action-only` | 2 | 0."))
    assert action.count(" [") == 6
    recon_delta = next(line for line in report.splitlines() if line.startswith("| `recon` | 1 | +") or
                       line.startswith("| `recon` | 1 | -"))  # fmt: skip
    assert recon_delta.count(" [") >= 3
    for label in ("most-popular", "frozen content (text:hashing-128)", "SASRec", "SASRec at equal training CPU"):
        assert f"| {label} |" in report
    headings = ["### all test users", *(f"### {seg} targets" for seg in ("warm", "cold", "head", "torso", "tail"))]
    for heading in [*headings, "## KARMA beside SASRec at equal training CPU"]:
        assert heading in report
    assert "served graphs identical" in report
    assert "| before the action stage | `action-only` | `recon` | reference |" in report
    assert "full ranking over all 1000 catalog items" in report
    for figure in ("hr_at_k.png", "training_curves.png", "attention_by_layer.png", "attention_maps.png", "deltas.png"):
        path = study.report_path / figure
        assert path.stat().st_size > 10_000, figure
        assert f"]({figure})" in report
    saved = json.loads((study.report_path / "results.json").read_text())
    assert saved["presets"]["action-only"]["seeds"] == [0, 1]


def test_aggregates_match_the_runs_and_their_ranks(smoke) -> None:
    study, results = smoke
    runs = results["runs"]
    values = [runs[f"action-only-s{s}"]["metrics"]["all"]["HR@200"] for s in (0, 1)]
    hr200 = results["presets"]["action-only"]["metrics"]["all"]["HR@200"]
    assert hr200["values"] == values and hr200["mean"] == pytest.approx(np.mean(values))
    assert hr200["std"] == pytest.approx(np.std(values, ddof=1))
    delta = results["deltas"]["recon"]["all"]["HR@200"]
    assert delta["seeds"] == [0]
    expected = runs["recon-s0"]["metrics"]["all"]["HR@200"] - runs["action-only-s0"]["metrics"]["all"]["HR@200"]
    assert delta["abs"]["mean"] == pytest.approx(expected)
    # The saved ranks reproduce the reported metrics, and the cold flags the cold segment.
    data = np.load(study.artifacts_dir / "runs" / "recon-s0" / RANKS_FILE)
    from_ranks = metrics_from_ranks(data["ranks"], (10, 50, 200))
    assert from_ranks["HR@10"] == pytest.approx(runs["recon-s0"]["metrics"]["all"]["HR@10"])
    cold = metrics_from_ranks(data["ranks"][data["cold"]], (200,))
    assert cold["HR@200"] == pytest.approx(runs["recon-s0"]["metrics"]["cold"]["HR@200"])
    # Every run was exported with the same served graph; only the train-only part differs.
    exports = [r["export"] for r in runs.values()]
    assert len({json.dumps(e["served_parameters"], sort_keys=True) for e in exports}) == 1
    assert len({e["cost"]["query_flops"] for e in exports}) == 1
    assert results["compare"]["identical_served_graphs"] is True


def test_buckets_intervals_and_equal_cpu_sasrec(smoke) -> None:
    study, results = smoke
    runs = results["runs"]
    m = runs["recon-s0"]["metrics"]
    # Every warm target is in exactly one popularity bucket; cold targets in none.
    assert sum(m[b]["count"] for b in ("head", "torso", "tail")) == m["warm"]["count"] and m["cold"]["count"] > 0
    data = np.load(study.artifacts_dir / "runs" / "recon-s0" / RANKS_FILE)
    assert ((data["bucket"] == -1) == data["cold"]).all()
    assert metrics_from_ranks(data["ranks"][data["bucket"] == 2], (200,))["HR@200"] == pytest.approx(
        m["tail"]["HR@200"]
    )
    intervals = results["intervals"]
    hr = intervals["models"]["action-only"]["all"]["HR@200"]
    assert hr["seeds"] == 2 and hr["users"] == m["all"]["count"]
    assert hr["mean"] == pytest.approx(results["presets"]["action-only"]["metrics"]["all"]["HR@200"]["mean"])
    assert hr["lo"] <= hr["mean"] <= hr["hi"] and hr["lo"] < hr["hi"]
    delta = intervals["deltas"]["recon"]["tail"]["HR@10"]
    assert delta["paired_seeds"] == [0]
    assert delta["mean"] == pytest.approx(m["tail"]["HR@10"] - runs["action-only-s0"]["metrics"]["tail"]["HR@10"])
    assert intervals["models"]["popular"]["cold"]["HR@200"]["mean"] == 0.0  # popularity never finds a cold item
    # SASRec again, under the training-loop CPU of action-only-s0.
    cpu = results["baselines"]["sasrec-cpu"]
    assert cpu["settings"]["max_cpu_seconds"] == round(runs["action-only-s0"]["seconds"]["train_cpu"], 1)
    assert cpu["training"]["epochs"] >= 1 and cpu["training"]["train_cpu"] > 0
    assert set(intervals["vs_sasrec_cpu"]) == {"action-only"}
    assert (study.report_path / "ranks.npz").exists()


def test_finished_runs_are_reused_and_other_configs_refused(smoke) -> None:
    study, _ = smoke
    done = study.artifacts_dir / "runs" / "action-only-s0" / RUN_RESULT
    before = done.stat().st_mtime_ns
    again = run_study(study, progress=False, figures=False)
    assert done.stat().st_mtime_ns == before and again["status"]["finished"] == 3
    # More threads is the same run (reused, not retrained); a config field that did not exist when the
    # run was made is ignored; a different step count is another run, refused, not mixed into the table.
    threads = study.run_config("action-only", 0, ["train.threads=2"])
    assert execute_run(threads, study.diagnose_users, export=False)["run"] == "action-only-s0"
    assert done.stat().st_mtime_ns == before
    stored = json.loads(done.read_text())["signature"]
    assert same_signature({k: v for k, v in stored.items() if k != "loss.lm_vocab"}, signature(threads))
    changed = study.run_config("action-only", 0, ["train.steps=7"])
    with pytest.raises(KarmaError, match="different configuration"):
        execute_run(changed, study.diagnose_users, export=False, progress=False)
    # A new seed is planned but, with --max-runs 0, not trained: the report says what is missing.
    more = study.model_copy(update={"seeds": [0, 1, 2]})
    partial = run_study(more, max_runs=0, progress=False, figures=False)
    assert partial["status"]["missing"] == ["action-only-s2"]
    assert "still to run: action-only-s2" in (study.report_path / "RESULTS.md").read_text()
    build_report(study, figures=False)  # leave the module's report as it was


def test_rediagnose_refreshes_finished_runs_without_training(smoke) -> None:
    study, _ = smoke
    run = study.artifacts_dir / "runs" / "recon-s0"
    result = json.loads((run / RUN_RESULT).read_text())
    del result["diagnostics"]["summary"]["h_mean_cosine"]  # as if made before that metric existed
    (run / RUN_RESULT).write_text(json.dumps(result))
    checkpoint = (run / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    assert rediagnose(study) == ["warmup-only-s0", "action-only-s0", "action-only-s1", "recon-s0"]
    refreshed = json.loads((run / RUN_RESULT).read_text())["diagnostics"]["summary"]
    assert -1.0 <= refreshed["h_mean_cosine"] <= 1.0
    assert (run / "checkpoint" / "model.safetensors").stat().st_mtime_ns == checkpoint


def test_aggregation_helpers() -> None:
    assert spread([0.1, 0.3, None, float("nan")]) == {
        "mean": pytest.approx(0.2),
        "std": pytest.approx(0.1414213),
        "n": 2,
        "values": [0.1, 0.3],
    }
    assert spread([0.5])["std"] is None and spread([])["mean"] is None

    def run(seed: int, hr: float) -> dict:
        return {"seed": seed, "metrics": {"all": {"HR@200": hr}}}

    runs = {"action-only": [run(0, 0.40), run(1, 0.50)], "recon": [run(0, 0.50), run(2, 0.9)]}
    d = paired_deltas(runs)["recon"]["all"]["HR@200"]
    assert d["seeds"] == [0] and d["abs"]["mean"] == pytest.approx(0.10) and d["rel_pct"] == pytest.approx(25.0)
    assert d["wins"] == 1
    np.testing.assert_allclose(hr_curve(np.array([0, 0, 3, 9, 250]), 5), [0.4, 0.4, 0.4, 0.6, 0.6])


def test_study_file_errors_name_the_problem(tmp_path: Path) -> None:
    base = SMOKE.read_text()
    cases = {
        "typo: 1\n": "typo",
        "overrides: [train.stepz=3]\n": "train.stepz",
        "headline: [gen]\n": "headline presets ['gen'] are not in presets",
        "presets: [recon]\nheadline: [recon]\n": "must include 'action-only'",
        "sasrec: {epochz: 3}\n": "epochz",
    }
    for i, (extra, needle) in enumerate(cases.items()):
        lines = [line for line in base.splitlines() if not line.startswith(extra.split(":")[0] + ":")]
        if extra.startswith("overrides"):
            lines = [line for line in lines if not line.startswith("  - ")]
        path = tmp_path / f"bad{i}.yaml"
        path.write_text("\n".join(lines) + "\n" + extra)
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            load_study(path)
    result = subprocess.run(
        [KARMA_BIN, "study", "--config", str(tmp_path / "missing.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: study file {tmp_path / 'missing.yaml'}: not found"
    ]


def test_adopt_writes_back_recorded_runs_and_refuses_other_configs(smoke, tmp_path: Path) -> None:
    """A fresh artifacts folder plus the published results.json: nothing retrains, the numbers are the same."""
    from recipes.study.adopt import adopt_results

    study, results = smoke
    published = study.report_path / "results.json"
    fresh = study.model_copy(update={"artifacts": tmp_path / "artifacts", "report_dir": tmp_path / "report"})
    outcome = adopt_results(fresh, published)
    assert sorted(outcome["adopted"]) == sorted(
        [*results["runs"], "warmup-only-s0", *(f"baseline {b}" for b in ("popular", "content", "sasrec", "sasrec-cpu"))]
    )
    assert outcome["refused"] == [] and adopt_results(fresh, published)["kept"] == outcome["adopted"]
    fresh.report_path.mkdir(parents=True)  # the report's rank archive travels with it: the same intervals
    (fresh.report_path / "ranks.npz").write_bytes((study.report_path / "ranks.npz").read_bytes())
    again = run_study(fresh, progress=False, figures=False, only=["sasrec"])  # everything is there: no training
    assert (
        again["status"]["missing"] == [] and not (tmp_path / "artifacts" / "runs" / "recon-s0" / "checkpoint").exists()
    )
    for name, run in again["runs"].items():
        assert run["metrics"] == results["runs"][name]["metrics"] and run["adopted"]["from"] == str(published)
    assert again["intervals"] == json.loads(published.read_text())["intervals"]
    report = (fresh.report_path / "RESULTS.md").read_text()
    assert "**Adopted runs:** warmup-only-s0" not in report and "action-only-s0 (adopted)" in report
    assert rediagnose(fresh) == []  # adopted runs have no checkpoint to re-diagnose
    # Another configuration (a smaller embedding) adopts nothing; an unknown --runs name is refused by name.
    changed = [*fresh.overrides, "model.embed_dim=16"]
    other = fresh.model_copy(update={"overrides": changed, "artifacts": tmp_path / "b"})
    refused = adopt_results(other, published)
    assert refused["adopted"] == [] and all("model.embed_dim: 32 -> 16" in r for r in refused["refused"])
    with pytest.raises(KarmaError, match="--runs: karma-s9 not in study smoke"):
        run_study(fresh, only=["karma-s9"], progress=False)
    wrong = tmp_path / "other.json"
    wrong.write_text(json.dumps({"study": {"name": "ml-1m"}}))
    with pytest.raises(KarmaError, match="holds study 'ml-1m', not 'smoke'"):
        adopt_results(fresh, wrong)


@pytest.mark.parametrize("path", sorted((REPO / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_study_file_loads(path: Path) -> None:
    """Each study file validates (overrides, presets, SASRec settings) and is named as its regenerate command says."""
    study = load_study(path)
    assert study.name == path.stem and REPO / "studies" / f"{study.name}.yaml" == path
