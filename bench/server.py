"""The real service for the benchmarks: `ddpm-serve` in a child process on a loopback port.

A child process has its own interpreter lock, so the benchmark's clients in this process do not slow the
service's event loop or engine thread, as they would in one process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

START_TIMEOUT = 900.0  # seconds: loading, plus compiling every bucket when DDPM_COMPILE is set


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(model: Path, *, device: str, threads: int | None, **settings: object) -> Iterator[str]:
    """Base URL of `ddpm-serve --model model` with DDPM_<NAME> = value for each setting; stopped on exit.

    `threads` sets the child's OMP_NUM_THREADS (torch's intra-op threads)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDPM_")}
    env.update({f"DDPM_{name.upper()}": str(value) for name, value in settings.items()})
    env.setdefault("DDPM_LOG_LEVEL", "warning")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-c", "from app.cli import serve_main; serve_main()"]
    command += ["--model", str(model), "--port", str(port), "--device", device]
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, child, log)
            yield url
        finally:
            child.terminate()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _wait_ready(url: str, child: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"ddpm-serve exited with {child.returncode}:\n{log.read()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"ddpm-serve was not ready within {START_TIMEOUT} s")
