"""The deployment files, checked by parsing (there is no Docker engine or cluster on the project's machines).

Each file is held against what it refers to: the compose stack against the Dockerfile, the config
schema (every KARMA_* variable goes through `load_config`) and the app's routes; Prometheus and the
nginx upstream against the compose service and the serve port; the Grafana dashboard's PromQL
against the metrics `service.metrics.Metrics` really exports (names and labels); the Kubernetes
manifests against each other (labels, selectors, ports, ConfigMap) and the routes; the locust file
against the routes. Locust itself is never imported (it monkey-patches the process with gevent).
"""

from __future__ import annotations

import ast
import json
import py_compile
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from karma.config import KarmaConfig, load_config
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "karma.json"
LOCUSTFILE = REPO / "loadtest" / "search.py"
PROMETHEUS_LABELS = {"instance", "job"}  # added by the scrape


# ---- shared readers ---------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


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


@cache
def dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def runtime_stage() -> list[str]:
    lines = dockerfile_lines()
    start = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[start:]


def dockerfile_cmd() -> list[str]:
    return json.loads(next(line for line in runtime_stage() if line.startswith("CMD "))[4:])


def dockerfile_env() -> dict[str, str]:
    env = {}
    for line in runtime_stage():
        if line.startswith("ENV "):
            env.update(dict(part.split("=", 1) for part in shlex.split(line[4:])))
    return env


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
    from prometheus_client.metrics import MetricWrapperBase

    from service.metrics import Metrics

    samples: dict[str, set[str]] = {}
    for collector in vars(Metrics()).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        name, kind, labels = collector._name, collector._type, set(collector._labelnames)
        if kind == "histogram":
            samples[f"{name}_bucket"] = labels | {"le"}
            samples[f"{name}_count"] = samples[f"{name}_sum"] = labels
        elif kind == "counter":
            samples[f"{name}_total"] = labels
        else:
            samples[name] = labels
    return samples


# ---- the image --------------------------------------------------------------------------------


def test_dockerfile_runtime_env_is_valid_config() -> None:
    """Every KARMA_* variable is a config key to `karma serve`: an unknown one stops the container at start."""
    env = karma_env(dockerfile_env())
    cfg = load_config(environ=env)
    assert str(cfg.serve.bundle) == option(dockerfile_cmd(), "--bundle") == "/bundle"


def test_dockerignore_keeps_the_context_small_and_the_sources_in() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", "artifacts", ".git"} <= ignored
    for line in dockerfile_lines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert source not in ignored, f"the Dockerfile copies {source}, which .dockerignore drops"


# ---- docker compose ---------------------------------------------------------------------------


def test_compose_has_the_stack() -> None:
    assert {"redis", "karma", "lb", "prometheus", "grafana"} <= set(compose()["services"])


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
    demo_bundle = REPO / defaults.paths.artifacts / "bundles" / defaults.train.run_name  # karma demo, step 6
    assert (COMPOSE_FILE.parent / source).resolve() == demo_bundle.resolve()


def test_compose_healthcheck_matches_the_dockerfile_and_the_serve_port() -> None:
    check = compose()["services"]["karma"]["healthcheck"]
    line = next(line for line in runtime_stage() if line.startswith("HEALTHCHECK "))
    options, _, command = line[len("HEALTHCHECK ") :].partition(" CMD ")
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


@pytest.mark.parametrize("expr", dashboard_exprs())
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
