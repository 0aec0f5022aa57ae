"""What the deployment tests read: the deployment files, parsed, and the tools that check them."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from app.settings import Settings
from tests.deploy.kustomize import split_image

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
DOTENV = REPO / ".env"  # read by `docker compose` from the project folder: the default profile
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu")
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}
# The image's caches (Dockerfile ENV): each must lie on a writable mount, the root being read-only.
# torch.compile (DDPM_COMPILE) writes, then loads, its kernels under the last two.
CACHE_VARIABLES = ("XDG_CACHE_HOME", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
# The names the manifests give the image (the GPU overlay's workers have one of their own, which its
# `images` maps to a real reference), after any registry.
OUR_IMAGES = {"ddpm-serve", "ddpm-serve-gpu"}


def yaml_files() -> list[Path]:
    """Every YAML file of the deployment."""
    files = [COMPOSE, *sorted((REPO / "docker").rglob("*.yml")), *sorted(K8S.rglob("*.yaml"))]
    return [f for f in files if f.is_file()]


def tool(name: str) -> str:
    """A console script of the test extra, from the interpreter's own environment."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable}: pip install -e '.[test]'")
    return str(path)


def setting_variables() -> set[str]:
    """DDPM_<FIELD> for every field of the Settings class (what ddpm-serve and ddpm-worker read)."""
    return {f"DDPM_{name.upper()}" for name in Settings.model_fields}


def is_our_image(reference: str) -> bool:
    """Whether a manifest's image is ddpm-serve, whatever the registry, tag or digest."""
    return split_image(reference)[0].rsplit("/", 1)[-1] in OUR_IMAGES


def is_within(path: str, mount: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(mount))


_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation of a string: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}` (unset or
    empty), `${VAR-default}` (unset); an unset variable without a default is empty, as in compose."""

    def substitute(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name = match["name"] or match["bare"]
        if match["op"] == ":-":
            return env.get(name) or match["default"]
        if match["op"] == "-":
            return env.get(name, match["default"])
        return env.get(name, "")

    return _VARIABLE.sub(substitute, value)


def _interpolated(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _interpolated(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolated(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


def compose(*, interpolated: bool = True) -> dict[str, Any]:
    """docker-compose.yml as `docker compose` reads it: variables interpolated from `.env` (compose also
    reads the shell's environment, which the tests leave out), or as written with interpolated=False."""
    spec = yaml.safe_load(COMPOSE.read_text())
    return _interpolated(spec, dotenv()) if interpolated else spec


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def dockerfile_stages() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Stage name -> (the image or stage it starts FROM, its instructions)."""
    stages: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current: list[tuple[str, str]] = []
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            base, _, name = args.partition(" AS ")
            current = []
            stages[name.strip()] = (base.strip(), current)
        elif stages:
            current.append((instruction, args))
    return stages


def dockerfile_image(variant: str = "cpu") -> list[tuple[str, str]]:
    """The instructions of the final image (`runtime`) of a variant, its parent stages' first."""
    stages = dockerfile_stages()
    chain, stage = [], "runtime"
    while stage in stages:
        chain.append(stage)
        stage = stages[stage][0].replace("${VARIANT}", variant)
    return [instruction for name in reversed(chain) for instruction in stages[name][1]]


def dockerfile_env(variant: str = "cpu") -> dict[str, str]:
    """The ENV of the final image (`runtime`) of a variant, inherited from its parent stages."""
    env: dict[str, str] = {}
    for instruction, args in dockerfile_image(variant):
        if instruction == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def dockerfile_apt_packages(variant: str = "cpu") -> set[str]:
    """The Debian packages the final image of a variant installs with apt-get (versions dropped)."""
    packages: set[str] = set()
    for instruction, args in dockerfile_image(variant):
        if instruction != "RUN":
            continue
        for command in args.split("&&"):
            words = command.split()
            if words[:1] == ["apt-get"] and "install" in words:
                after = words[words.index("install") + 1 :]
                packages |= {word.partition("=")[0] for word in after if not word.startswith("-")}
    return packages


def dockerfile_arg(name: str) -> str:
    for instruction, args in dockerfile_instructions():
        match = re.fullmatch(rf"{name}=(\S+)", args) if instruction == "ARG" else None
        if match:
            return match.group(1)
    raise KeyError(name)


def service_environment(name: str) -> dict[str, str]:
    """A compose service's `environment` (anchors and merge keys resolved), values as strings."""
    return {key: str(value) for key, value in compose()["services"][name].get("environment", {}).items()}


def dotenv() -> dict[str, str]:
    """The variables of `.env`, which only plain `NAME=value` lines may set (compose's dotenv syntax
    accepts more: quotes, `export`, interpolation; this file needs none of it)."""
    values: dict[str, str] = {}
    for line in DOTENV.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=([A-Za-z0-9_.,-]*)", line)
        assert match, f".env: not a plain NAME=value line: {line!r}"
        values[match[1]] = match[2]
    return values


def active_services(profiles: set[str]) -> set[str]:
    """The compose services `docker compose up` starts with these profiles active: every service without
    `profiles`, and those with one of them."""
    services = compose()["services"]
    return {name for name, s in services.items() if not s.get("profiles") or set(s["profiles"]) & profiles}
