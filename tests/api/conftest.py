"""End-to-end fixtures: tiny checkpoints on disk and real uvicorn servers on loopback ports."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from PIL import Image

from app.api import create_app
from app.settings import Settings

TERMINAL = ("succeeded", "failed", "cancelled")


def save_tiny(folder: Path, *, timesteps: int, variance_type: str, nan: bool = False) -> Path:
    """An 8×8 grayscale DDPM U-Net (~0.7 M parameters, ~10 ms per forward on one CPU core). `nan`: its
    output convolution's weights are NaN, so every job on it fails (`non_finite`), as a diverged
    training run's checkpoint would."""
    import torch

    from app.nets import SchedulerConfig, UNet, UNetConfig, save_checkpoint

    config = UNetConfig.ddpm(
        resolution=8,
        in_channels=1,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
    )
    unet = UNet(config)
    if nan:
        torch.nn.init.constant_(unet.conv_out.weight, float("nan"))
    return save_checkpoint(
        folder, unet, SchedulerConfig(num_train_timesteps=timesteps, variance_type=variance_type)
    )


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two models: `tiny` (T = 1000, σ² = β, the default) and `tiny2` (T = 100, σ² = β̃)."""
    root = tmp_path_factory.mktemp("models")
    return [
        str(save_tiny(root / "tiny", timesteps=1000, variance_type="fixed_large")),
        str(save_tiny(root / "tiny2", timesteps=100, variance_type="fixed_small")),
    ]


@pytest.fixture(scope="session")
def broken_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`broken`: tiny (T = 100) with NaN output weights: every job on it fails with `non_finite`."""
    folder = tmp_path_factory.mktemp("broken") / "broken"
    return str(save_tiny(folder, timesteps=100, variance_type="fixed_small", nan=True))


@dataclass
class Live:
    url: str
    app: FastAPI
    headers: dict[str, str] = field(default_factory=dict)

    def client(self, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers={**self.headers, **headers})


@contextmanager
def live_server(settings: Settings) -> Iterator[Live]:
    """`create_app(settings)` served by uvicorn in a thread, on a port the OS picked."""
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start (see the log above)")
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not start within 60 s")
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def server_settings(models: list[str], **overrides: Any) -> Settings:
    return Settings(models=models, device="cpu", **overrides)


def wait_for(client: httpx.Client, job_id: str, predicate, timeout: float = 60.0) -> dict[str, Any]:
    """Poll GET /jobs/{id} until `predicate(job)`; the job."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}").raise_for_status().json()
        if predicate(job):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout} s")
        time.sleep(0.02)


def wait_done(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    return wait_for(client, job_id, lambda job: job["status"] in TERMINAL, timeout)


@dataclass
class SSE:
    id: int | None
    event: str | None
    data: Any


def read_sse(response: httpx.Response, *, comments: list[str] | None = None) -> Iterator[SSE]:
    """Parse a text/event-stream response into messages (comments go to `comments` when given)."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if fields:
                data = fields.get("data")
                yield SSE(
                    int(fields["id"]) if "id" in fields else None,
                    fields.get("event"),
                    json.loads(data or "null"),
                )
                fields = {}
            continue
        if line.startswith(":"):
            if comments is not None:
                comments.append(line)
            continue
        name, _, value = line.partition(":")
        fields[name] = value.removeprefix(" ")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)", line)
        if not match or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[3] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match[4])
    return 0.0


def png_b64(seed: int, *, size: int = 8, mode: str = "L") -> str:
    """A random 8-bit image as base64 PNG (grayscale `L` or `RGB`)."""
    shape = (size, size) if mode == "L" else (size, size, len(mode))
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def fetch_npy(client: httpx.Client, job: dict[str, Any]) -> np.ndarray:
    """All images of a finished job, (n, C, H, W) float32."""
    response = client.get(f"/jobs/{job['id']}/images.npy")
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content), allow_pickle=False)
