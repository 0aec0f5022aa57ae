"""A small kustomize: renders k8s/ overlays with exactly the features they use, so the test suite can
validate what `kubectl apply -k` would send without kubectl or a cluster.

Supported, with kustomize's meaning: `resources` (files and folders with a kustomization), `components`
(kind Component: its resources are added, then its patches apply to everything so far), `patches`
whose file is a JSON patch (RFC 6902: add, remove, replace, test) with a `target` of kind and name,
`namespace` (set on every namespaced object), and `images` (`newName`, `newTag`, `digest` by image name,
applied one entry after another after the patches). Anything
else in a kustomization is an error here, so the overlays cannot quietly outgrow the renderer.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"
SUPPORTED = {"apiVersion", "kind", "resources", "components", "patches", "namespace", "images"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}

Resource = dict[str, Any]


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not support, or a patch does not apply."""


def load_documents(path: Path) -> list[Resource]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def render(folder: Path) -> list[Resource]:
    """The objects `kustomize build folder` would output (in resource order)."""
    return _build(folder.resolve(), expected_kind="Kustomization")


def _build(folder: Path, *, expected_kind: str, into: list[Resource] | None = None) -> list[Resource]:
    spec = yaml.safe_load((folder / KUSTOMIZATION).read_text())
    if spec.get("kind", "Kustomization") != expected_kind:
        raise KustomizeError(f"{folder}: kind {spec.get('kind')!r}, expected {expected_kind}")
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{folder}/{KUSTOMIZATION}: unsupported fields {sorted(unknown)}")
    resources = into if into is not None else []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            resources += _build(path, expected_kind="Kustomization")
        else:
            resources += load_documents(path)
    for entry in spec.get("components", []):
        _build((folder / entry).resolve(), expected_kind="Component", into=resources)
    for patch in spec.get("patches", []):
        _apply_patch(folder, patch, resources)
    for image in spec.get("images", []):
        _set_image(resources, image)
    if "namespace" in spec:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource.setdefault("metadata", {})["namespace"] = spec["namespace"]
    return resources


def _apply_patch(folder: Path, patch: dict[str, Any], resources: list[Resource]) -> None:
    if set(patch) != {"path", "target"} or set(patch["target"]) != {"kind", "name"}:
        raise KustomizeError(f"{folder}: only patches with `path` and a kind/name `target` are supported")
    operations = yaml.safe_load((folder / patch["path"]).read_text())
    if not isinstance(operations, list):
        raise KustomizeError(f"{folder / patch['path']}: only JSON patches (a list of operations)")
    target = patch["target"]
    matched = [r for r in resources if (r["kind"], r["metadata"]["name"]) == (target["kind"], target["name"])]
    if not matched:
        raise KustomizeError(f"{folder / patch['path']}: no resource matches {target}")
    for resource in matched:
        for operation in operations:
            apply_operation(resource, operation)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"not a JSON pointer: {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _child(node: Any, key: str) -> Any:
    if isinstance(node, list):
        return node[int(key)]
    return node[key]


def apply_operation(document: Resource, operation: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, remove, replace, test), in place."""
    op, parts = operation["op"], _pointer(operation["path"])
    try:
        parent = document
        for key in parts[:-1]:
            parent = _child(parent, key)
        last = parts[-1]
        if op == "test":
            if _child(parent, last) != operation["value"]:
                raise KustomizeError(f"test failed at {operation['path']}: {_child(parent, last)!r}")
        elif op == "add":
            value = copy.deepcopy(operation["value"])
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), value)
            else:
                parent[last] = value
        elif op == "replace":
            _child(parent, last)  # must exist
            parent[int(last) if isinstance(parent, list) else last] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        else:
            raise KustomizeError(f"unsupported JSON patch operation {op!r}")
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise KustomizeError(f"{op} {operation['path']}: no such location ({e!r})") from e


def pod_specs(resource: Resource) -> list[dict[str, Any]]:
    """The pod templates' specs of a workload (Deployment, StatefulSet, …); none for other kinds."""
    template = resource.get("spec", {}).get("template")
    return [template["spec"]] if template else []


def split_image(reference: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference, tag and digest "" when absent: a registry's port
    (`host:5000/x`) is part of the name."""
    name, _, digest = reference.partition("@")
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        return name[:colon], name[colon + 1 :], digest
    return name, "", digest


def _set_image(resources: list[Resource], image: dict[str, str]) -> None:
    unknown = set(image) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise KustomizeError(f"images: unsupported fields {sorted(unknown)}")
    for resource in resources:
        for spec in pod_specs(resource):
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                name, tag, digest = split_image(container["image"])
                if name != image["name"]:
                    continue
                name = image.get("newName", name)
                if "newTag" in image or "digest" in image:  # either replaces both, as in kustomize
                    tag, digest = image.get("newTag", ""), image.get("digest", "")
                container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
