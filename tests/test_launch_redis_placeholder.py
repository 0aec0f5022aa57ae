"""A Redis URL whose password is k8s/base/secret.template.yaml's placeholder stops `ddpm-serve` and
`ddpm-worker` at start-up with one line (app/launch.py), as an API key left at its placeholder does: an
unedited Secret must not run with a password anyone can read in the repository."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app import launch, serve
from app.worker import main as worker
from tests.redis_server import free_port

LINE = (
    "DDPM_REDIS_URL: the Redis password is the placeholder of k8s/base/secret.template.yaml; set "
    "REDIS_PASSWORD in the Secret ddpm-secrets to a random one (docs/deployment.md) and restart Redis too"
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.upper().startswith("DDPM_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:CHANGEME@ddpm-redis:6379/0",  # as the manifests assemble it from the template
        "redis://default:changeme@ddpm-redis:6379/0",
        "rediss://:CHANGE-ME@redis.example.com:6380/0",
        "redis://ddpm-redis:6379/0?password=CHANGEME",
        "redis://:CHANGE%2DME@ddpm-redis:6379/0",
    ],
)
@pytest.mark.parametrize("prog, module", [("ddpm-serve", serve), ("ddpm-worker", worker)])
def test_the_placeholder_password_stops_start_up_in_one_line(monkeypatch, url, prog, module):
    monkeypatch.setenv("DDPM_REDIS_URL", url)
    with pytest.raises(SystemExit) as exit_:
        launch.start(prog, module.build_parser().parse_args([]), module.FLAGS)
    assert str(exit_.value.code) == f"{prog}: {LINE}"


@pytest.mark.parametrize(
    "url",
    [None, "redis://127.0.0.1:6379/0", "redis://:0a1b2c3d4e5f60718293a4b5c6d7e8f9@ddpm-redis:6379/0"],
)
def test_other_urls_start(monkeypatch, url):
    if url:
        monkeypatch.setenv("DDPM_REDIS_URL", url)
    settings = launch.start("ddpm-serve", serve.build_parser().parse_args([]), serve.FLAGS)
    assert settings.redis_url == url


def test_the_server_process_exits_1_with_the_line_before_listening():
    port = free_port()
    command = [sys.executable, "-c", "from app.cli import serve_main; serve_main()", "--port", str(port)]
    env = {"DDPM_REDIS_URL": f"redis://:CHANGEME@127.0.0.1:{free_port()}/0"}
    import os

    run = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert run.returncode == 1 and run.stderr.strip() == f"ddpm-serve: {LINE}", run.stderr
