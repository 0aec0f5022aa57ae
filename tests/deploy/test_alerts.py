"""Alert rules: compose's Prometheus loads docker/prometheus/alerts.yml, the monitoring component ships the
same groups as a PrometheusRule (which kubernetes-validate has no schema for: checked here, as the
ServiceMonitor is), and every rule is checked statically: its fields, durations, brackets, the metrics
and labels it names (real ones, from app/metrics.py), its job matchers (the same roles under compose and
the Prometheus Operator) and what its annotations quote. Also the dashboard's queue panels, which must
show something with no worker up."""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from app import metrics
from tests.deploy.kustomize import render
from tests.deploy.repo import CRD_KINDS, K8S, REPO, compose
from tests.deploy.test_drift import DASHBOARD, job_selections

RULES = REPO / "docker" / "prometheus" / "alerts.yml"
RULE_FIELDS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")
FUNCTIONS = {
    "absent",
    "rate",
    "increase",
    "sum",
    "max",
    "min",
    "count",
    "avg",
    "vector",
    "histogram_quantile",
}
KEYWORDS = {"by", "without", "and", "or", "unless", "on", "ignoring", "bool"}
SEVERITIES = {"critical", "warning", "info"}


def rules_file() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in rules_file()["groups"] for rule in group["rules"]]


def label_names() -> dict[str, set[str]]:
    """Sample name -> its labels, for every metric of app/metrics.py, and Prometheus's own `up`."""
    names: dict[str, set[str]] = {"up": {"job", "instance"}}
    for value in vars(metrics).values():
        labels = set(getattr(value, "_labelnames", ())) | {"job", "instance"}
        if isinstance(value, Counter):
            names[f"{value._name}_total"] = labels
        elif isinstance(value, Histogram):
            names |= {f"{value._name}_sum": labels, f"{value._name}_count": labels}
            names[f"{value._name}_bucket"] = labels | {"le"}
        elif isinstance(value, Gauge):
            names[value._name] = labels
    return names


def test_compose_prometheus_loads_the_rules_file():
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    (path,) = config["rule_files"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in compose()["services"]["prometheus"]["volumes"][:-1])
    sources = {target: source for source, target in mounts.items()}
    assert (REPO / sources[path]).resolve() == RULES.resolve()
    assert PurePosixPath(path).parent == PurePosixPath("/etc/prometheus")


def test_the_prometheus_rule_ships_the_same_rules_next_to_the_service_monitor():
    docs = render(K8S / "overlays" / "gpu")
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert "PrometheusRule" in CRD_KINDS  # not sent to kubernetes-validate, which has no schema for it
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"} and set(rule["spec"]) == {"groups"}
    assert rule["metadata"]["namespace"] == monitor["metadata"]["namespace"] == "ddpm"
    assert rule["metadata"]["labels"] == monitor["metadata"]["labels"]  # one selector label finds both
    assert rule["spec"] == rules_file()


def test_every_rule_is_well_formed():
    spec = rules_file()
    assert set(spec) == {"groups"}
    names = [rule["alert"] for rule in all_rules()]
    assert len(names) == len(set(names)) and all(re.fullmatch(r"Ddpm[A-Z]\w+", n) for n in names)
    for group in spec["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"]
    for rule in all_rules():
        assert set(rule) <= RULE_FIELDS and {"alert", "expr", "labels", "annotations"} <= set(rule), rule
        for key in ("for", "keep_firing_for"):
            assert key not in rule or DURATION.fullmatch(rule[key]), rule
        assert rule["labels"]["severity"] in SEVERITIES
        assert {"summary", "description"} <= set(rule["annotations"])
        assert all(
            isinstance(v, str) and v for v in [*rule["labels"].values(), *rule["annotations"].values()]
        )


@pytest.mark.parametrize("rule", all_rules(), ids=lambda rule: rule["alert"])
def test_every_expression_names_real_metrics_labels_and_functions(rule):
    expr = rule["expr"]
    text = re.sub(r'"[^"]*"', '""', expr)  # label values: free text
    depth = {"(": 0, "{": 0, "[": 0}
    closing = {")": "(", "}": "{", "]": "["}
    for char in text:
        if char in depth:
            depth[char] += 1
        elif char in closing:
            depth[closing[char]] -= 1
            assert depth[closing[char]] >= 0, expr
    assert set(depth.values()) == {0}, expr
    for window in re.findall(r"\[([^\]]*)\]", text):
        assert DURATION.fullmatch(window), expr
    known = label_names()
    used: set[str] = set()
    bare = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", text)  # label lists, not metrics
    for name, _, matchers in re.findall(r"\b([a-z_][a-z0-9_]*)\b(\{([^}]*)\})?", bare):
        if name in FUNCTIONS | KEYWORDS or re.fullmatch(r"\d+\w*", name):
            continue
        assert name in known, f"{name}: not a metric of app/metrics.py (nor up): {expr}"
        used.add(name)
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
            assert label in known[name], f"{name} has no label {label}"
    assert used, expr
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        for label in filter(None, (g.strip() for g in grouping.split(","))):
            assert any(label in known[name] for name in used), f"no metric of {expr} has a label {label}"
    kept = {g.strip() for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr) for g in grouping.split(",")}
    for annotation in rule["annotations"].values():
        for label in re.findall(r"\$labels\.(\w+)", annotation):
            assert label in kept, f"{rule['alert']} quotes $labels.{label}, which its expression drops"


def test_the_job_matchers_select_the_same_roles_under_compose_and_the_operator():
    for op, value, selected in job_selections([rule["expr"] for rule in all_rules()]):
        assert selected["compose"] == selected["kubernetes"] == {"worker"}, (op, value, selected)


def test_the_rules_cover_what_an_operator_must_hear_about():
    exprs = {rule["alert"]: rule["expr"] for rule in all_rules()}
    wanted = {
        "no worker up": lambda e: "absent(up{" in e and "ddpm-worker" in e,
        "queue lag": lambda e: "ddpm_queue_lag" in e and ">" in e,
        "5xx rate": lambda e: 'status=~"5.."' in e and "rate(" in e,
        "dead letters": lambda e: "increase(ddpm_worker_dead_letters_total" in e,
    }
    missing = {topic for topic, test in wanted.items() if not any(test(e) for e in exprs.values())}
    assert missing == set()


def test_the_queue_and_worker_panels_show_something_with_no_worker_up():
    """Only workers export the consumer-group figures and `up` of a worker job: each such target falls
    back on what the API exports (ddpm_queue_waiting) or on vector(0), so the panel is not blank."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dashboard["panels"] if p["type"] != "row"}
    worker_only = ("ddpm_queue_pending", "ddpm_queue_lag", 'up{job=~"ddpm-worker')
    for title in ("Queue depth", "Workers"):
        for target in panels[title]["targets"]:
            expr = target["expr"]
            if any(name in expr for name in worker_only):
                assert re.search(r"\bor\s+(vector\(0\)|max by \(model\) \(ddpm_queue_waiting\))", expr), expr
    waiting = [
        t["expr"] for t in panels["Queue depth"]["targets"] if t["legendFormat"] == "waiting {{model}}"
    ]
    assert waiting == ["max by (model) (ddpm_queue_waiting)"]  # the API sets it too: max, not sum
    assert "API replica" in metrics.QUEUE_WAITING._documentation
