"""What the deployment tests read: the deployment files, parsed, and the tools that check them."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
DOTENV = REPO / ".env"  # read by `docker compose` from the project folder: the default profile
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu")
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}


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


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


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


def dockerfile_env(variant: str = "cpu") -> dict[str, str]:
    """The ENV of the final image (`runtime`) of a variant, inherited from its parent stages."""
    stages = dockerfile_stages()
    chain, stage = [], "runtime"
    while stage in stages:
        chain.append(stage)
        stage = stages[stage][0].replace("${VARIANT}", variant)
    env: dict[str, str] = {}
    for name in reversed(chain):
        for instruction, args in stages[name][1]:
            if instruction == "ENV":
                for pair in shlex.split(args):
                    key, _, value = pair.partition("=")
                    env[key] = value
    return env


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
