"""A real distributed deployment per test module: redis-server, `ddpm-serve` and `ddpm-worker` processes.

Everything runs as the user would run it (subprocesses of the real entry points, loopback ports, a tiny
T = 50 checkpoint in tmp_path) and everything is stopped by the fixtures, SIGKILL as the last resort.
Short heartbeats and reclaim time keep the fault tests quick.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.jobs.redis_keys import Keys
from app.jobs.registry import ModelSpec
from tests.redis_server import RedisServer, free_port
from tests.tiny import save_tiny, tiny_checkpoint

TERMINAL = ("succeeded", "failed", "cancelled")
HEARTBEAT_SECONDS = 0.5
RECLAIM_SECONDS = 2.0
MAX_BATCH = 8
START_TIMEOUT = 90.0  # importing torch on two busy cores


@dataclass
class Proc:
    """A child process with its log in a file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    metrics_url: str = ""  # workers: their Prometheus endpoint

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{self.name}: no VmRSS")

    def signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self, timeout: float = 20.0) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ---\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class Cluster:
    """Redis + API processes + workers; `url` is the current API's."""

    root: Path
    model: Path
    redis_server: RedisServer
    env: dict[str, str]
    apis: list[Proc] = field(default_factory=list)
    workers: dict[str, Proc] = field(default_factory=dict)
    url: str = ""

    @property
    def redis(self) -> redis.Redis:
        return self.redis_server.client()

    def _spawn(self, name: str, entry: str, args: list[str], env: dict[str, str]) -> Proc:
        log = self.root / f"{name}.log"
        command = [sys.executable, "-c", f"from app.cli import {entry}; {entry}()", *args]
        with log.open("ab") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env={**self.env, **env}, cwd=Path.cwd()
            )
        return Proc(name, process, log)

    def start_api(self) -> Proc:
        port = free_port()
        api = self._spawn(f"api{len(self.apis)}", "serve_main", ["--port", str(port)], {})
        self.apis.append(api)
        self.url = f"http://127.0.0.1:{port}"
        return api

    def start_worker(self, name: str, **settings: Any) -> Proc:
        env = {f"DDPM_{k.upper()}": str(v) for k, v in settings.items()}
        port = free_port()
        args = ["--model", str(self.model), "--device", "cpu", "--name", name, "--metrics-port", str(port)]
        worker = self._spawn(name, "worker_main", args, env)
        worker.metrics_url = f"http://127.0.0.1:{port}/metrics"
        self.workers[name] = worker
        return worker

    def wait_up(self) -> None:
        """Until every worker has a heartbeat and the API answers: /readyz where workers run (its refresh
        has then read the models they published: a request right after would otherwise meet "no model is
        available yet"), /healthz where none does."""
        deadline = time.monotonic() + START_TIMEOUT
        for proc in [*self.apis[-1:], *self.workers.values()]:
            assert proc.alive(), proc.tail()
        path = "/readyz" if any(w.alive() for w in self.workers.values()) else "/healthz"
        while True:
            try:
                api_up = httpx.get(f"{self.url}{path}", timeout=2).status_code == 200
            except httpx.TransportError:
                api_up = False
            beating = all(self.redis.exists(f"ddpm:worker:{n}") for n, w in self.workers.items() if w.alive())
            if api_up and beating:
                return
            for proc in [*self.apis[-1:], *self.workers.values()]:
                assert proc.alive() or proc.process.returncode == 0, proc.tail()
            assert time.monotonic() < deadline, "\n".join(
                p.tail() for p in [*self.apis, *self.workers.values()]
            )
            time.sleep(0.2)

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def logs(self) -> str:
        return "\n".join(p.tail() for p in [*self.apis, *self.workers.values()])

    def close(self) -> None:
        for proc in [*self.apis, *self.workers.values()]:
            proc.stop()
        self.redis_server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, with the model `tiny` (T = 50) published as a worker would: an
    API replica in distributed mode with no worker running."""
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    server.client().hset(Keys().models, "tiny", ModelSpec.of(tiny_checkpoint(timesteps=50)).to_json())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny", timesteps=50)


@pytest.fixture(scope="module")
def make_cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[Callable[..., Cluster]]:
    """Clusters for a module, each with its own redis-server (AOF on, everysec), all closed at its end."""
    clusters: list[Cluster] = []

    def make(workers: tuple[str, ...] = ("a", "b"), **settings: Any) -> Cluster:
        root = tmp_path_factory.mktemp("cluster")
        server = RedisServer(root / "redis", appendonly=True).start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DDPM_")}
        env |= {
            "OMP_NUM_THREADS": "1",
            "DDPM_REDIS_URL": server.url,
            "DDPM_WORKER_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
            "DDPM_RECLAIM_IDLE_SECONDS": str(RECLAIM_SECONDS),
            "DDPM_MAX_BATCH": str(MAX_BATCH),
            "DDPM_LOG_LEVEL": "info",
        }
        env |= {f"DDPM_{k.upper()}": str(v) for k, v in settings.items()}
        cluster = Cluster(root, tiny_model, server, env)
        clusters.append(cluster)
        cluster.start_api()
        for name in workers:
            cluster.start_worker(name)
        cluster.wait_up()
        return cluster

    yield make
    for cluster in clusters:
        cluster.close()


def wait_all(client: httpx.Client, job_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Poll until every job has ended; the final jobs by id."""
    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, Any]] = {}
    while True:
        for job_id in [j for j in job_ids if j not in done]:
            response = client.get(f"/jobs/{job_id}")
            if response.status_code == 200 and response.json()["status"] in TERMINAL:
                done[job_id] = response.json()
        if len(done) == len(job_ids):
            return done
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(job_ids) - len(done)} of {len(job_ids)} jobs did not end in {timeout} s"
            )
        time.sleep(0.1)


def final_events(r: redis.Redis, job_id: str) -> list[str]:
    """The types of a job's final events as stored (exactly one for a job that ended once)."""
    entries = r.xrange(f"ddpm:job:{{{job_id}}}:events")
    return [f[b"type"].decode() for _, f in entries if f[b"type"] != b"progress"]


def pending_on(r: redis.Redis, consumer: str) -> list[str]:
    """Queue entries pending on a worker (the jobs it holds)."""
    rows = r.xpending_range("ddpm:queue:tiny", "workers", min="-", max="+", count=100, consumername=consumer)
    return [row["message_id"].decode() for row in rows]


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples in Prometheus text (every label set)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total
