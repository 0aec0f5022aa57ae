"""`ddpm-worker`: load models, then run jobs from the Redis queues until SIGTERM (exit 0).

Flags override `DDPM_*` environment variables (the same `Settings` as `ddpm-serve`; `DDPM_REDIS_URL` is
required). Several workers may run per host, one per GPU (`--device cuda:N`), each with a unique name.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from pydantic import ValidationError

from app.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddpm-worker",
        description="Run DDPM jobs from the Redis queues of distributed mode (needs DDPM_REDIS_URL). "
        "Environment variables as for ddpm-serve; see docs/distributed.md.",
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="REF",
        help="model to load and serve (folder, PRESET:WEIGHTS or hf:REPO); repeatable",
    )
    p.add_argument("--device", help="torch device: auto, cpu, cuda, cuda:1, …")
    p.add_argument("--name", help="consumer name, unique among the workers (default: HOST-PID)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        "models": args.model,
        "device": args.device,
        "worker_name": args.name,
        "worker_metrics_port": args.metrics_port,
    }
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ValidationError as e:
        sys.exit(f"ddpm-worker: invalid settings\n{e}")
    if not settings.redis_url:
        sys.exit("ddpm-worker: DDPM_REDIS_URL is not set; a worker takes its jobs from Redis")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

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
