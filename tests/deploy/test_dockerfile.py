"""The image: hadolint-clean, non-root, health-checked, dependencies cached before the code, nothing
in the build context that it does not need."""

from __future__ import annotations

import fnmatch
import re
import subprocess

import pytest

from app.cli import BUNDLED_MODEL
from app.evaluation.cli import DEFAULT_CLASSIFIER
from tests.deploy.repo import (
    CACHE_VARIABLES,
    DOCKERFILE,
    HEALTHCHECK,
    REPO,
    dockerfile_apt_packages,
    dockerfile_arg,
    dockerfile_env,
    dockerfile_instructions,
    dockerfile_stages,
    tool,
)


def hadolint(path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("hadolint"), "--no-color", str(path)], capture_output=True, text=True)


def test_hadolint_clean():
    run = hadolint(DOCKERFILE)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_hadolint_ignores_are_explained():
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if "hadolint ignore" in line]
    assert ignores, "no inline ignores: drop this test's expectation if hadolint needs none"
    for i in ignores:
        rules = re.findall(r"DL\d{4}|SC\d{4}", lines[i])
        reason = lines[i - 1]
        assert reason.startswith("#") and all(rule in reason for rule in rules), (
            f"line {i + 1}: the comment above an ignore must name {rules} and say why"
        )


def test_hadolint_reports_problems(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install fastapi\n")
    assert {"DL3006", "DL3013"} <= set(re.findall(r"DL\d{4}", hadolint(bad).stdout))


def test_two_variants_share_one_runtime():
    stages = dockerfile_stages()
    assert {"deps", "runtime-cpu", "runtime-gpu", "runtime"} <= set(stages)
    assert stages["runtime"][0] == "runtime-${VARIANT}"
    assert dockerfile_arg("VARIANT") in ("cpu", "gpu")
    assert "NVIDIA_VISIBLE_DEVICES" in dockerfile_env("gpu")
    assert "NVIDIA_VISIBLE_DEVICES" not in dockerfile_env("cpu")
    deps = " ".join(args for instruction, args in stages["deps"][1] if instruction == "RUN")
    assert "torch==2.13.0" in deps and "download.pytorch.org/whl/cpu" in deps


def test_dependencies_are_installed_before_the_code_is_copied():
    deps = dockerfile_stages()["deps"][1]
    copies = [args for instruction, args in deps if instruction == "COPY"]
    assert copies == ["pyproject.toml constraints.txt ./"], "the deps stage sees only the dependency files"
    assert any(ins == "RUN" and "-r requirements.txt" in args for ins, args in deps)
    runtime = dockerfile_stages()["runtime"][1]
    order = [args for ins, args in runtime if ins == "COPY"]
    assert order[0] == "--from=deps /opt/venv /opt/venv" and any(a.startswith("app/") for a in order[1:])


def test_runs_as_a_numeric_non_root_user():
    users = [args for instruction, args in dockerfile_instructions() if instruction == "USER"]
    assert users == ["${UID}:${UID}"]
    assert int(dockerfile_arg("UID")) >= 10000


def test_healthcheck_probes_the_served_endpoints():
    checks = [args for instruction, args in dockerfile_instructions() if instruction == "HEALTHCHECK"]
    assert len(checks) == 1 and "/app/docker/healthcheck.py" in checks[0]
    source = HEALTHCHECK.read_text()
    assert "/healthz" in source and "/metrics" in source


def test_environment():
    env = dockerfile_env()
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["DDPM_HOST"] == "0.0.0.0"
    secretive = [k for k in env if re.search(r"KEY|PASSWORD|TOKEN|SECRET", k)]
    args = [a for ins, a in dockerfile_instructions() if ins == "ARG" and re.search(r"KEY|PASSWORD|TOKEN", a)]
    assert not secretive and not args, "no secrets in the image"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_torch_compile_has_a_compiler_and_writable_caches(variant):
    """DDPM_COMPILE=true: inductor builds CPU kernels with g++, Triton its GPU launchers with cc (g++ depends
    on gcc); python:3.11-slim has neither. Their caches default to the read-only HOME (~/.triton) or a
    user-named /tmp folder: the image puts all its caches under /tmp, the mount compose and the
    manifests make writable (test_compose.py, test_k8s.py)."""
    assert "g++" in dockerfile_apt_packages(variant)
    env = dockerfile_env(variant)
    for name in CACHE_VARIABLES:
        assert env[name].startswith("/tmp/"), f"{name}={env[name]}"


def test_entrypoint_and_default_role():
    instructions = dict(dockerfile_instructions())
    assert instructions["ENTRYPOINT"] == '["/app/docker/entrypoint.sh"]'
    assert instructions["CMD"] == '["api"]'


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        pattern = pattern.removeprefix("**/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes) or fnmatch.fnmatchcase(parts[-1], pattern):
            ignored = not negate
    return ignored


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    text = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in text if line.strip() and not line.startswith("#")]


def test_context_holds_what_the_image_copies(ignore_patterns):
    sources = []
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY" and "--from" not in args:
            sources += [a for a in args.split() if not a.startswith("--")][:-1]
    assert {"models/mnist/", "models/mnist-classifier/"} <= set(sources)
    for source in sources:
        assert not _ignored(source.rstrip("/"), ignore_patterns), f"{source} is excluded by .dockerignore"
    assert (REPO / "models" / "mnist").resolve() == BUNDLED_MODEL, "the bundled model is where app.cli looks"
    # README: the image reads the bundled model and the classifier (`ddpm eval`'s default) from models/.
    assert (REPO / "models" / "mnist-classifier").resolve() == DEFAULT_CLASSIFIER


@pytest.mark.parametrize(
    "path", ["ddpm.env", ".env", ".venv/bin/python", ".git/config", "runs/x", "tests/x.py"]
)
def test_context_leaves_out_secrets_and_local_state(ignore_patterns, path):
    assert _ignored(path, ignore_patterns)
