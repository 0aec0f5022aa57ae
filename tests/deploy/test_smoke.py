"""The containers' processes, run as plain processes: Redis with docker/redis.conf, then the API and a CPU
worker started through docker/entrypoint.sh with the environment the image and docker-compose.yml give
them (addresses changed to loopback ports, a checkpoint "mounted" at a temporary /models), and one job
end to end over HTTP. What is not exercised here: the image build itself and the GPU."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.repo import ENTRYPOINT, HEALTHCHECK, REPO, dockerfile_env, service_environment
from tests.redis_server import free_port
from tests.tiny import save_tiny

pytestmark = [pytest.mark.service, pytest.mark.slow]

START_SECONDS = 90  # a cold start imports torch and loads the model in both processes, on 2 shared cores


def container_env(service: str, overrides: dict[str, str]) -> dict[str, str]:
    """What the container of a compose service sees: the image's ENV, then the service's `environment`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDPM_")}
    image = dockerfile_env("cpu")
    image.pop("PATH")  # the image's venv is this interpreter's
    env |= image | service_environment(service) | overrides
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """redis-server with the compose file's redis.conf (its AOF and data in a temporary directory)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH (Debian: apt-get install redis-server)")
    data, port = tmp_path_factory.mktemp("redis-data"), free_port()
    conf = (REPO / "docker" / "redis.conf").read_text()
    command = ["redis-server", "-", "--port", str(port), "--bind", "127.0.0.1"]
    process = subprocess.Popen(command, cwd=data, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    process.stdin.write(conf)
    process.stdin.close()
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while (
        subprocess.run(["redis-cli", "-u", url, "ping"], capture_output=True, text=True).stdout.strip()
        != "PONG"
    ):
        assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.1)
    config = subprocess.run(["redis-cli", "-u", url, "config", "get", "*"], capture_output=True, text=True)
    settings = dict(zip(*[iter(config.stdout.split("\n"))] * 2, strict=False))
    assert settings["appendonly"] == "yes" and settings["maxmemory-policy"] == "noeviction"
    yield url
    process.terminate()
    process.wait(10)


def start(role: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(ENTRYPOINT), role], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )


def stop(process: subprocess.Popen[bytes], log: Path) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # what `docker stop` and Kubernetes send
        try:
            return process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"did not stop on SIGTERM:\n{log.read_text()[-3000:]}")
    return process.returncode


def test_one_job_through_api_and_worker(redis_url, tmp_path):
    models = tmp_path / "models"  # the /models mount
    save_tiny(models / "tiny")
    api_port, metrics_port = free_port(), free_port()
    loopback = {
        "DDPM_REDIS_URL": redis_url,
        "DDPM_HOST": "127.0.0.1",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    api_env = container_env("api", loopback | {"DDPM_PORT": str(api_port)})
    worker_env = container_env(
        "worker-cpu",
        loopback | {"DDPM_WORKER_METRICS_PORT": str(metrics_port), "DDPM_MODELS": str(models / "tiny")},
    )
    logs = {"api": tmp_path / "api.log", "worker": tmp_path / "worker.log"}
    worker = start("worker", worker_env, logs["worker"])
    api = start("api", api_env, logs["api"])
    codes: dict[str, int] = {}
    try:
        base = f"http://127.0.0.1:{api_port}"
        with httpx.Client(base_url=base, timeout=30) as http:
            deadline = time.monotonic() + START_SECONDS
            while True:
                for name, process in (("api", api), ("worker", worker)):
                    assert process.poll() is None, f"{name} exited:\n{logs[name].read_text()[-3000:]}"
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"not ready:\n{logs['api'].read_text()[-2000:]}"
                time.sleep(0.5)

            for env in (api_env, worker_env):  # the image's HEALTHCHECK, in each container
                assert subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, timeout=30).returncode == 0

            assert [m["name"] for m in http.get("/models").json()] == ["tiny"]
            body = {"n": 2, "steps": 5, "sampler": "ddim", "seed": 0}
            job = http.post("/sample", params={"wait": "true"}, json=body, timeout=120).json()
            assert job["status"] == "succeeded", job
            grid = http.get(f"/jobs/{job['id']}/grid.png")
            assert grid.status_code == 200 and grid.content.startswith(b"\x89PNG")

            assert "ddpm_http_request_duration_seconds_bucket" in http.get("/metrics").text
            worker_metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            assert 'ddpm_images_total{model="tiny"} 2.0' in worker_metrics
            assert "ddpm_engine_step_seconds_bucket" in worker_metrics
    finally:
        codes = {"api": stop(api, logs["api"]), "worker": stop(worker, logs["worker"])}
    # The worker exits 0 after its graceful shutdown; uvicorn shuts down gracefully, then re-raises the
    # SIGTERM it caught (exit status 143 in a container).
    assert codes == {"api": -signal.SIGTERM, "worker": 0}, {k: logs[k].read_text()[-2000:] for k in codes}
    assert "Finished server process" in logs["api"].read_text()
    assert "stopped" in logs["worker"].read_text().splitlines()[-1]
