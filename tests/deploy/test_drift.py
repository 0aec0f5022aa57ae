"""Drift guards: the deployment names only settings, roles, metrics and paths the code really has."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from app import cli, metrics
from tests.deploy.kustomize import pod_specs, render
from tests.deploy.repo import (
    COMPOSE,
    DOCKERFILE,
    ENTRYPOINT,
    HEALTHCHECK,
    K8S,
    OVERLAYS,
    REPO,
    compose,
    is_our_image,
    setting_variables,
)
from tests.redis_server import free_port

DEPLOYMENT_FILES = [
    DOCKERFILE,
    COMPOSE,
    REPO / "ddpm.env.example",
    *sorted(p for p in (REPO / "docker").rglob("*") if p.is_file()),
    *sorted(K8S.rglob("*.yaml")),
]
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "ddpm-serve.json"
ROLES = {"api": "ddpm-serve", "worker": "ddpm-worker"}


def test_every_ddpm_variable_is_a_setting():
    used: dict[str, set[str]] = {}
    for path in DEPLOYMENT_FILES:
        for name in re.findall(r"\bDDPM_[A-Z0-9_]+\b", path.read_text()):
            used.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert {"DDPM_REDIS_URL", "DDPM_API_KEYS", "DDPM_WORKER_METRICS_PORT"} <= set(used)
    unknown = {name: sorted(files) for name, files in used.items() if name not in setting_variables()}
    assert not unknown, f"not fields of app/settings.py: {unknown}"


def test_entrypoint_roles_run_the_real_programs():
    arms = dict(
        re.findall(r"^\s+(\w+)\)\n(?:.*\n)*?\s+exec (\S+) \"\$@\"", ENTRYPOINT.read_text(), re.MULTILINE)
    )
    assert arms == ROLES
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ddpm-serve"] == "app.cli:serve_main" and callable(cli.serve_main)
    assert scripts["ddpm-worker"] == "app.cli:worker_main" and callable(cli.worker_main)


def test_compose_and_manifests_use_only_those_roles():
    services = compose()["services"]
    commands = {
        name: s["command"][0] for name, s in services.items() if s.get("image", "").startswith("ddpm")
    }
    assert commands == {"api": "api", "worker": "worker", "worker-cpu": "worker"}
    for overlay in OVERLAYS:
        for doc in render(K8S / "overlays" / overlay):
            for spec in pod_specs(doc):
                for container in spec["containers"]:
                    if is_our_image(container["image"]):
                        assert container["args"][0] in ROLES


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDPM_")}
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}"
    return env | extra


@pytest.mark.parametrize("role", ROLES)
def test_entrypoint_passes_arguments_to_the_role(role):
    env = _env(DDPM_REDIS_URL="redis://127.0.0.1:1/0")
    run = subprocess.run(
        [str(ENTRYPOINT), role, "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: {ROLES[role]}")


def test_entrypoint_refuses_a_worker_without_redis():
    run = subprocess.run([str(ENTRYPOINT), "worker"], env=_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 64 and "DDPM_REDIS_URL" in run.stderr


def test_entrypoint_runs_other_commands_as_given():
    run = subprocess.run([str(ENTRYPOINT), "echo", "a b"], env=_env(), capture_output=True, text=True)
    assert (run.returncode, run.stdout) == (0, "a b\n")


def test_healthcheck_fails_when_nothing_answers():
    env = _env(DDPM_PORT=str(free_port()), DDPM_WORKER_METRICS_PORT=str(free_port()))
    assert subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, timeout=30).returncode == 1


def _exposed_names() -> set[str]:
    """Every sample name app/metrics.py exposes (a counter `x` is `x_total`, a histogram `x_bucket`, …)."""
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            names.add(f"{value._name}_total")
        elif isinstance(value, Histogram):
            names |= {f"{value._name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        elif isinstance(value, Gauge):
            names.add(value._name)
    return names


def test_dashboard_uses_real_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    expressions = [t["expr"] for p in panels for t in p["targets"]]
    used = {name for expr in expressions for name in re.findall(r"\bddpm_\w+", expr)}
    assert used <= _exposed_names(), used - _exposed_names()
    wanted = {
        "latency": "ddpm_http_request_duration_seconds_bucket",
        "queue depth": "ddpm_queue_waiting",
        "queue wait": "ddpm_queue_wait_seconds_bucket",
        "images/s": "ddpm_images_total",
        "batch size": "ddpm_engine_batch_size_bucket",
        "step time": "ddpm_engine_step_seconds_bucket",
        "GPU memory": "ddpm_device_memory_bytes",
        "errors": "ddpm_jobs_total",
    }
    assert {topic for topic, name in wanted.items() if name not in used} == set()
    assert all(p["datasource"]["uid"] == "prometheus" for p in panels)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def _job_roles() -> dict[str, dict[str, str]]:
    """Prometheus's `job` label of each role's targets: compose's from docker/prometheus.yml; the
    Prometheus Operator's from the ServiceMonitor (the Service's name, unless the monitor sets jobLabel)."""
    roles = {
        name: service["command"][0] for name, service in compose()["services"].items() if "command" in service
    }
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    jobs = {"compose": {}, "kubernetes": {}}
    for job in config["scrape_configs"]:
        (role,) = {roles[name] for sd in job["dns_sd_configs"] for name in sd["names"]}
        jobs["compose"][job["job_name"]] = role
    docs = render(K8S / "overlays" / "gpu")
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    ports = {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]}
    for service in (d for d in docs if d["kind"] == "Service"):
        labels = service["metadata"]["labels"]
        selected = all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
        if selected and ports & {port["name"] for port in service["spec"]["ports"]}:
            job = (
                labels[monitor["spec"]["jobLabel"]]
                if "jobLabel" in monitor["spec"]
                else service["metadata"]["name"]
            )
            jobs["kubernetes"][job] = labels["app.kubernetes.io/component"]
    assert set(jobs["compose"].values()) == set(jobs["kubernetes"].values()) == {"api", "worker"}
    return jobs


def job_selections(expressions: list[str]) -> list[tuple[str, str, dict[str, set[str]]]]:
    """Each `job` label matcher of these PromQL expressions (op, value) with the roles (api, worker) it
    selects in each set-up: compose's job names and the Prometheus Operator's (the Services' names)."""
    jobs = _job_roles()
    matchers = [m for expr in expressions for m in re.findall(r'\bjob\s*(=~|!~|!=|=)\s*"([^"]*)"', expr)]
    assert matchers, "nothing selects by job: drop this check"
    selections = []
    for op, value in matchers:
        assert op in ("=", "=~"), f"job{op}: not checked here"
        selected = {
            setup: {
                role
                for job, role in names.items()
                if (job == value if op == "=" else re.fullmatch(value, job))
            }
            for setup, names in jobs.items()
        }
        selections.append((op, value, selected))
    return selections


def test_dashboard_job_matchers_fit_compose_and_kubernetes():
    """A panel on `job="ddpm-worker"` is empty under the Prometheus Operator, whose job is the Service's
    name (ddpm-worker-metrics): each matcher must select the same roles in both set-ups."""
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
    for op, value, selected in job_selections(expressions):
        assert selected["compose"] and selected["compose"] == selected["kubernetes"], (op, value, selected)
