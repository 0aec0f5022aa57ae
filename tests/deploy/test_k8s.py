"""k8s/: both overlays render, pass `kubernetes-validate --strict` (the CRD-based objects, which it has no
schema for, are checked here), and keep the promises of the deployment: restricted pods, probes on the
real endpoints, graceful worker termination, least-privilege network policies, KEDA on the real queue."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.jobs.redis_keys import GROUP, Keys
from app.settings import Settings
from tests.deploy.kustomize import (
    KUSTOMIZATION,
    KustomizeError,
    apply_operation,
    load_documents,
    pod_specs,
    render,
    split_image,
)
from tests.deploy.repo import (
    CACHE_VARIABLES,
    CRD_KINDS,
    K8S,
    OVERLAYS,
    REPO,
    dockerfile_env,
    is_our_image,
    is_within,
    tool,
)

# The oldest Kubernetes the manifests support (preStop `sleep` is on by default from 1.30) and the newest
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / "overlays" / request.param)


def kubernetes_validate(paths: list[Path], version: str) -> subprocess.CompletedProcess[str]:
    command = [tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_overlays_pass_kubernetes_validate_strict(tmp_path, version):
    paths = []
    for name in OVERLAYS:
        for i, doc in enumerate(render(K8S / "overlays" / name)):
            if doc["kind"] not in CRD_KINDS:
                paths.append(tmp_path / f"{name}-{i:02d}-{doc['kind']}-{doc['metadata']['name']}.yaml")
                paths[-1].write_text(yaml.safe_dump(doc))
    paths.append(K8S / "base" / "secret.template.yaml")
    run = kubernetes_validate(paths, version)
    assert run.returncode == 0, run.stdout + run.stderr


def test_kubernetes_validate_strict_rejects_unknown_fields(tmp_path):
    deployment = by_kind(render(K8S / "overlays" / "cpu"), "Deployment")["ddpm-worker"]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(deployment))
    run = kubernetes_validate([path], KUBERNETES_VERSIONS[-1])
    assert run.returncode != 0 and "livenesProbe" in run.stdout + run.stderr


def test_overlays_differ_as_intended():
    cpu, gpu = (render(K8S / "overlays" / name) for name in OVERLAYS)
    assert {d["kind"] for d in cpu} & CRD_KINDS == set(), "the laptop overlay needs no CRDs"
    assert {d["kind"] for d in gpu} >= CRD_KINDS
    cpu_worker, gpu_worker = (pod_specs(by_kind(d, "Deployment")["ddpm-worker"])[0] for d in (cpu, gpu))
    assert "nvidia.com/gpu" not in str(cpu_worker)
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_worker[
        "tolerations"
    ]
    assert split_image(gpu_worker["containers"][0]["image"])[1].endswith("gpu")
    assert cpu_worker["containers"][0]["image"] == _container(cpu, "ddpm-api")["image"] == "ddpm-serve:cpu"
    assert by_kind(cpu, "ConfigMap")["ddpm-config"]["data"]["DDPM_DEVICE"] == "cpu"
    assert by_kind(gpu, "ConfigMap")["ddpm-config"]["data"]["DDPM_DEVICE"] == "cuda"
    volumes = {v["name"]: v for v in gpu_worker["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] in by_kind(gpu, "PersistentVolumeClaim")


def test_gpu_workers_need_only_the_device_plugin():
    """The GPU request places a worker on a node with a free GPU. A node selector on a label that only
    NVIDIA's GPU Operator sets (nvidia.com/gpu.present, from feature discovery) would leave the workers
    Pending on clusters with the plain device plugin, which docs/deployment.md says is enough."""
    worker = pod_specs(by_kind(render(K8S / "overlays" / "gpu"), "Deployment")["ddpm-worker"])[0]
    resources = worker["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert "nodeSelector" not in worker and "affinity" not in worker
    assert "nvidia.com/gpu.product" in (REPO / "docs" / "deployment.md").read_text(), "how to pin a GPU type"


def test_gpu_workers_roll_out_without_a_spare_gpu():
    """A surge pod needs a GPU of its own: with every GPU in use it stays Pending and the rollout stalls.
    GPU workers are replaced one at a time instead, as many as the PodDisruptionBudget lets go."""
    cpu, gpu = (render(K8S / "overlays" / name) for name in OVERLAYS)
    strategy = by_kind(gpu, "Deployment")["ddpm-worker"]["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert by_kind(gpu, "PodDisruptionBudget")["ddpm-worker"]["spec"]["maxUnavailable"] == 1
    # CPU workers have no such scarce resource: a new pod is ready before an old one goes.
    cpu_strategy = by_kind(cpu, "Deployment")["ddpm-worker"]["spec"]["strategy"]["rollingUpdate"]
    assert cpu_strategy == {"maxSurge": 1, "maxUnavailable": 0}


def test_gpu_cluster_runs_release_images():
    """A mutable tag (`:gpu`) with imagePullPolicy IfNotPresent: pushing a new build under it rolls nothing
    out, and nodes keep whichever build they pulled first. The overlay's `images` names a release tag (or a
    digest) per variant; kustomize matches images by name alone, so the workers' has a name of its own."""
    spec = yaml.safe_load((K8S / "overlays" / "gpu" / KUSTOMIZATION).read_text())
    entries = {entry["name"]: entry for entry in spec["images"]}
    assert set(entries) == {"ddpm-serve", "ddpm-serve-gpu"}
    for name, entry in entries.items():  # kustomize applies them in turn: none may rename into another
        assert split_image(entry.get("newName", name))[0] not in set(entries) - {name}, name
    docs = render(K8S / "overlays" / "gpu")
    for deployment, variant in (("ddpm-api", "cpu"), ("ddpm-worker", "gpu")):
        container = _container(docs, deployment)
        name, tag, digest = split_image(container["image"])
        assert name.rsplit("/", 1)[-1] == "ddpm-serve", container["image"]
        assert digest.startswith("sha256:") or re.fullmatch(rf"v?\d+\.\d+\.\d+\S*-{variant}", tag), tag
        assert container["imagePullPolicy"] == "IfNotPresent"


def test_models_volume_binds_only_a_prepared_volume():
    """The default StorageClass would refuse ReadOnlyMany, or provision an empty volume that nothing can
    fill (the workers mount it read-only): the claim binds to a PersistentVolume made for it."""
    pvc = by_kind(render(K8S / "overlays" / "gpu"), "PersistentVolumeClaim")["ddpm-models"]["spec"]
    assert pvc["accessModes"] == ["ReadOnlyMany"]
    assert pvc["storageClassName"] == ""
    guide = (REPO / "docs" / "deployment.md").read_text()
    assert 'storageClassName: ""' in guide and "volumeName" in guide


def test_caches_are_on_a_writable_volume(overlay):
    """The image's caches (torch.compile's kernels among them) under the read-only root: on an emptyDir,
    which Kubernetes mounts without noexec; and no pod setting moves them elsewhere."""
    _, docs = overlay
    config = by_kind(docs, "ConfigMap")["ddpm-config"]["data"]
    for workload in (d for d in docs if pod_specs(d)):
        spec = pod_specs(workload)[0]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in (c for c in spec["containers"] if is_our_image(c["image"])):
            env = dockerfile_env("gpu" if "gpu" in container["image"] else "cpu")
            names = {e["name"] for e in container.get("env", [])} | set(config)
            assert not names & {*CACHE_VARIABLES, "HOME"}, workload["metadata"]["name"]
            writable = [
                m["mountPath"]
                for m in container["volumeMounts"]
                if "emptyDir" in volumes[m["name"]] and not m.get("readOnly")
            ]
            for variable in CACHE_VARIABLES:
                assert any(is_within(env[variable], mount) for mount in writable), variable


def test_every_object_is_in_the_namespace(overlay):
    _, docs = overlay
    for doc in docs:
        expected = None if doc["kind"] == "Namespace" else "ddpm"
        assert doc["metadata"].get("namespace") == expected, f"{doc['kind']}/{doc['metadata']['name']}"


def test_pods_are_restricted(overlay):
    _, docs = overlay
    workloads = [d for d in docs if pod_specs(d)]
    assert {d["metadata"]["name"] for d in workloads} == {"ddpm-api", "ddpm-worker", "ddpm-redis"}
    for workload in workloads:
        spec = pod_specs(workload)[0]
        name = workload["metadata"]["name"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["enableServiceLinks"] is False, f"{name}: service links would inject DDPM_* variables"
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(
                resources["limits"]
            ), name
            if is_our_image(container["image"]):
                assert pod["runAsUser"] >= 10000, name
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                volumes = {v["name"]: v for v in spec["volumes"]}
                assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: writable /tmp under a read-only root"


def _container(docs, name: str) -> dict[str, Any]:
    return pod_specs(by_kind(docs, "Deployment")[name])[0]["containers"][0]


def _port(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def test_probes_and_ports_match_the_app(overlay, app_routes, app_query_parameters):
    _, docs = overlay
    config = by_kind(docs, "ConfigMap")["ddpm-config"]["data"]
    api, worker = _container(docs, "ddpm-api"), _container(docs, "ddpm-worker")
    assert api["args"] == ["api"] and worker["args"] == ["worker"]
    assert _port(api, "http") == int(config["DDPM_PORT"]) == Settings.model_fields["port"].default
    assert _port(worker, "metrics") == int(config["DDPM_WORKER_METRICS_PORT"])
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # The replica's own readiness, not the workers' (tests/distributed/test_readiness.py)
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz?workers=false", "port": "http"}
    assert "workers" in app_query_parameters["/readyz"]
    assert {"/healthz", "/readyz", "/metrics"} <= app_routes
    for probe in ("startupProbe", "livenessProbe"):
        assert worker[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    services = by_kind(docs, "Service")
    assert services["ddpm-api"]["spec"]["ports"][0]["targetPort"] == "http"
    assert services["ddpm-worker-metrics"]["spec"]["ports"][0]["targetPort"] == "metrics"
    env = {e["name"]: e for e in api["env"]}
    assert env["DDPM_API_KEYS"]["valueFrom"]["secretKeyRef"] == {
        "name": "ddpm-secrets",
        "key": "DDPM_API_KEYS",
    }
    for container in (api, worker):
        env = [e["name"] for e in container["env"]]
        assert env.index("REDIS_PASSWORD") < env.index("DDPM_REDIS_URL"), "$(REDIS_PASSWORD) expands in order"
        url = next(e["value"] for e in container["env"] if e["name"] == "DDPM_REDIS_URL")
        assert url == "redis://:$(REDIS_PASSWORD)@ddpm-redis:6379/0"
        assert "ddpm-redis" in services


def test_workers_outlive_their_grace_period(overlay):
    _, docs = overlay
    grace = float(by_kind(docs, "ConfigMap")["ddpm-config"]["data"]["DDPM_WORKER_GRACE_SECONDS"])
    spec = pod_specs(by_kind(docs, "Deployment")["ddpm-worker"])[0]
    # After the grace period: hand back (up to 5 s for the engines), flush writes, retire the heartbeat.
    assert spec["terminationGracePeriodSeconds"] >= grace + 20


def test_api_scales_and_survives_disruptions(overlay):
    _, docs = overlay
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["ddpm-api"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "ddpm-api" and hpa["spec"]["minReplicas"] >= 2
    pdbs = by_kind(docs, "PodDisruptionBudget")
    assert pdbs["ddpm-api"]["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain must be possible"
    assert pdbs["ddpm-worker"]["spec"]["maxUnavailable"] == 1


def test_redis_keeps_its_append_only_file(overlay):
    _, docs = overlay
    redis = by_kind(docs, "StatefulSet")["ddpm-redis"]
    conf = by_kind(docs, "ConfigMap")["ddpm-redis-config"]["data"]["redis.conf"]
    assert conf == (REPO / "docker" / "redis.conf").read_text(), "k8s and compose run Redis alike"
    assert (
        "appendonly yes" in conf and "appendfsync everysec" in conf and "maxmemory-policy noeviction" in conf
    )
    mounts = {
        m["mountPath"]: m["name"] for m in redis["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert mounts["/data"] in {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    assert redis["spec"]["template"]["spec"]["containers"][0]["image"].startswith("redis:7")


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policies_deny_by_default_and_allow_only_whats_needed(overlay):
    _, docs = overlay
    policies = by_kind(docs, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    labels = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if pod_specs(d)
    }

    def ingress_ports(pod: str) -> set[int]:
        return {
            port["port"]
            for policy in policies.values()
            if _selects(policy["spec"]["podSelector"], labels[pod]) and policy["spec"]["podSelector"]
            for rule in policy["spec"].get("ingress", [])
            for port in rule["ports"]
        }

    assert ingress_ports("ddpm-api") == {8000}
    assert ingress_ports("ddpm-worker") == {8001}
    assert ingress_ports("ddpm-redis") == {6379}
    redis_from = policies["ddpm-redis"]["spec"]["ingress"][0]["from"]
    for client in ("ddpm-api", "ddpm-worker"):
        assert any(
            "podSelector" in peer and _selects(peer["podSelector"], labels[client]) for peer in redis_from
        )
        egress = policies[client]["spec"]["egress"]
        assert any(
            _selects(peer["podSelector"], labels["ddpm-redis"]) for rule in egress for peer in rule["to"]
        )


def test_keda_scales_workers_on_the_real_queue():
    docs = render(K8S / "overlays" / "gpu")
    scaled = by_kind(docs, "ScaledObject")["ddpm-worker"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "ddpm-worker",
    }
    assert scaled["spec"]["minReplicaCount"] >= 1, "no worker, no readiness, no job to scale up on"
    assert scaled["spec"]["maxReplicaCount"] >= scaled["spec"]["minReplicaCount"]
    auth = by_kind(docs, "TriggerAuthentication")
    template = load_documents(K8S / "base" / "secret.template.yaml")[0]
    known = {"address", "databaseIndex", "stream", "consumerGroup", "lagCount", "streamLength"}
    triggers = scaled["spec"]["triggers"]
    assert triggers and all(t["type"] == "redis-streams" for t in triggers)
    for trigger in triggers:
        metadata = trigger["metadata"]
        assert set(metadata) <= known and all(isinstance(v, str) for v in metadata.values())
        assert metadata["stream"] == Keys().queue("mnist")
        assert metadata["address"] == "ddpm-redis.ddpm.svc.cluster.local:6379"
        for ref in auth[trigger["authenticationRef"]["name"]]["spec"]["secretTargetRef"]:
            assert ref["name"] == template["metadata"]["name"] and ref["key"] in template["stringData"]
    modes = [{"lagCount", "streamLength"} & set(t["metadata"]) for t in triggers]
    assert modes == [{"lagCount"}, {"streamLength"}]
    assert triggers[0]["metadata"]["consumerGroup"] == GROUP


def test_service_monitor_scrapes_the_metrics_ports(app_routes):
    docs = render(K8S / "overlays" / "gpu")
    monitor = by_kind(docs, "ServiceMonitor")["ddpm-serve"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    services = [
        s
        for s in by_kind(docs, "Service").values()
        if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    ports = {p["name"] for s in services for p in s["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval"}
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics" in app_routes
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"http", "metrics"}


def test_renderer_refuses_what_it_does_not_support(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        render(tmp_path)
    with pytest.raises(KustomizeError, match="test failed"):
        apply_operation({"a": [1]}, {"op": "test", "path": "/a/0", "value": 2})
    with pytest.raises(KustomizeError, match="no such location"):
        apply_operation({"a": {}}, {"op": "replace", "path": "/a/b", "value": 1})
    (tmp_path / "kustomization.yaml").write_text("resources: []\nimages: [{name: x, newImage: y}]\n")
    with pytest.raises(KustomizeError, match="newImage"):
        render(tmp_path)


def test_renderer_sets_images_as_kustomize_does(tmp_path):
    images = ["ddpm-serve:cpu", "ddpm-serve-gpu", "host:5000/ddpm-serve:1@sha256:ab", "ddpm-serve:cpu"]
    containers = [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
    pod = {
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"template": {"spec": {"containers": containers}}},
    }
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["pod.yaml"],
                "images": [
                    {"name": "ddpm-serve", "newName": "r.io/ddpm-serve", "newTag": "1.0-cpu"},
                    {"name": "ddpm-serve-gpu", "digest": "sha256:cd"},
                    {"name": "host:5000/ddpm-serve", "newTag": "2"},
                ],
            }
        )
    )
    rendered = [c["image"] for c in render(tmp_path)[0]["spec"]["template"]["spec"]["containers"]]
    expected = ["r.io/ddpm-serve:1.0-cpu", "ddpm-serve-gpu@sha256:cd", "host:5000/ddpm-serve:2"]
    assert rendered == [*expected, expected[0]]


def test_the_worker_computes_on_as_many_threads_as_its_cpu_limit(overlay):
    """torch would take the node's cores; under a CPU quota of a few, that team waits at every step."""
    _, docs = overlay
    worker = _container(docs, "ddpm-worker")
    env = {e["name"]: e for e in worker["env"]}
    ref = env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": worker["name"], "resource": "limits.cpu"}
    assert worker["resources"]["limits"]["cpu"]
