"""The Redis password of the Kubernetes deployment: never on redis-server's command line (anyone on the node
can read /proc/<pid>/cmdline), and never the Secret template's placeholder, which Redis and the API
(app/launch.py) both refuse in one line at start-up."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
import yaml

from tests.deploy.kustomize import render
from tests.deploy.repo import K8S, OVERLAYS, REPO
from tests.redis_server import free_port

TEMPLATE = K8S / "base" / "secret.template.yaml"


def _redis_container(overlay: str) -> dict:
    (statefulset,) = [
        d
        for d in render(K8S / "overlays" / overlay)
        if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "ddpm-redis"
    ]
    return statefulset["spec"]["template"]["spec"]["containers"][0]


def _placeholder() -> str:
    return yaml.safe_load(TEMPLATE.read_text())["stringData"]["REDIS_PASSWORD"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_password_is_not_an_argument_of_any_process(overlay):
    container = _redis_container(overlay)
    argv = [*container.get("command", []), *container.get("args", [])]
    assert not any("requirepass" in arg and "\n" not in arg for arg in argv)  # only inside the script
    assert not any("$(REDIS_PASSWORD)" in arg for arg in argv), "Kubernetes would expand it into argv"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["REDIS_PASSWORD"] == {"name": "ddpm-secrets", "key": "REDIS_PASSWORD"}


def _run(tmp_path: Path, password: str) -> tuple[subprocess.Popen[str], int]:
    """The redis container's command, run here: its config path swapped for docker/redis.conf (the same
    text, tests/deploy/test_k8s.py) with a free port, in `tmp_path` (its /data)."""
    if shutil.which("redis-server") is None:  # a failure, not a skip: CI must not pass without Redis
        pytest.fail("redis-server is not on PATH (apt-get install redis-server; `make test` does)")
    container = _redis_container("cpu")
    port = free_port()
    conf = tmp_path / "redis.conf"
    conf.write_text((REPO / "docker" / "redis.conf").read_text() + f"\nport {port}\nbind 127.0.0.1\n")
    argv = [*container["command"], *container["args"]]
    assert "/etc/redis/redis.conf" in argv[-1]
    argv[-1] = argv[-1].replace("/etc/redis/redis.conf", str(conf))
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": password}
    process = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return process, port


def test_redis_requires_the_password_it_got_on_stdin_and_shows_it_to_no_one(tmp_path):
    password = secrets.token_hex(16)
    process, port = _run(tmp_path, password)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert redis.Redis(port=port, password=password, socket_timeout=2).ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2).ping()
        # `exec`: the shell became redis-server (it gets SIGTERM), whose arguments hold no password.
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        assert b"redis-server" in cmdline and password.encode() not in cmdline, cmdline
        assert Path(f"/proc/{process.pid}/exe").resolve().name.startswith("redis-"), "no exec: a shell"
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize("password", ["", "placeholder", "ChangeMe"])
def test_redis_refuses_an_empty_or_placeholder_password_in_one_line(tmp_path, password):
    process, _ = _run(tmp_path, _placeholder() if password == "placeholder" else password)
    _, err = process.communicate(timeout=10)
    assert process.returncode == 1 and len(err.splitlines()) == 1 and "ddpm-secrets" in err, err


@pytest.mark.parametrize("password", ["two words", 'quo"te', "new\nrename-command CONFIG x", "p@ss:w/rd"])
def test_redis_refuses_a_password_its_config_parser_or_a_url_would_misread(tmp_path, password):
    """The password reaches Redis as a config line (a space, quote or newline would break it or add
    lines of its own) and the API as part of DDPM_REDIS_URL."""
    process, _ = _run(tmp_path, password)
    _, err = process.communicate(timeout=10)
    assert process.returncode == 1 and "letters, digits and . _ ~ - only" in err, err


def test_the_api_and_workers_refuse_the_placeholder_in_the_redis_url():
    from app.launch import redis_placeholder_line

    url = f"redis://:{_placeholder()}@ddpm-redis:6379/0"  # as api.yaml and worker.yaml assemble it
    line = redis_placeholder_line(url)
    assert line is not None and line.startswith("DDPM_REDIS_URL: ") and _placeholder() not in line
