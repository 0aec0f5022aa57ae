"""`ddpm-worker`: load models, then run jobs from the Redis queues until SIGTERM (exit 0).

Flags override `DDPM_*` environment variables (the same `Settings` as `ddpm-serve`; `DDPM_REDIS_URL` is
required). Several workers may run per host, one per GPU (`--device cuda:N`), each with a unique name.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from app import launch
from app.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    p = launch.parser(
        "ddpm-worker",
        "Run DDPM jobs from the Redis queues of distributed mode (needs DDPM_REDIS_URL); "
        "see docs/distributed.md.",
        model_help="model to load and serve (folder, PRESET:WEIGHTS or hf:REPO); repeatable",
    )
    p.add_argument("--name", help="consumer name, unique among the workers (default: HOST-PID)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    return p


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "models": args.model,
        "device": args.device,
        "worker_name": args.name,
        "worker_metrics_port": args.metrics_port,
    }


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given on top."""
    return launch.settings_with(**_flags(args))


def main(argv: list[str] | None = None) -> None:
    settings = launch.start("ddpm-worker", **_flags(build_parser().parse_args(argv)))
    if not settings.redis_url:
        sys.exit("ddpm-worker: DDPM_REDIS_URL is not set; a worker takes its jobs from Redis")

    from app.jobs.redis_connect import sync_client
    from app.loading import load_models
    from app.worker.worker import Worker, default_name

    try:
        checkpoints = load_models(settings)
    except Exception as e:  # a bad model reference: say which, and stop
        sys.exit(f"ddpm-worker: could not load the models: {e}")
    worker = Worker(
        settings, checkpoints, sync_client(settings.redis_url), name=settings.worker_name or default_name()
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    if settings.worker_metrics_port is not None:
        serve_metrics(settings)
    worker.run()
    if worker.engine_died:
        sys.exit("ddpm-worker: an engine thread died (see the log); its jobs were handed back")


def serve_metrics(settings: Settings) -> Any:
    """Prometheus `/metrics` on `worker_metrics_port`, bound to `host` (DDPM_HOST: loopback by default, as
    the API; the image sets 0.0.0.0), from a daemon thread; the server (`.server_address`, `.shutdown()`)."""
    from prometheus_client import start_http_server

    server, _ = start_http_server(settings.worker_metrics_port, addr=settings.host)
    return server
