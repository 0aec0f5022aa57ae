"""`ddpm-worker`: load models, then run jobs from the Redis queues until SIGTERM (exit 0).

Flags override `DDPM_*` environment variables (the same `Settings` as `ddpm-serve`; `DDPM_REDIS_URL` is
required). Several workers may run per host, one per GPU (`--device cuda:N`), each with a unique name.

Start-up failures are one line on stderr, before any model is loaded (app/launch.py): invalid settings
(exit 1, one line per problem; unknown `DDPM_*` variables are warned about), no Redis URL (exit 1), a
metrics port that cannot be listened on (exit 3: `ddpm-worker: cannot listen on 127.0.0.1:9100 for
/metrics: address already in use`); then a model that does not load (exit 1). The metrics port listens
from before the models load but answers only after: a probe of it fails until the worker is ready.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
from typing import Any

from app import launch
from app.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    p = launch.parser(
        "ddpm-worker",
        "Run DDPM jobs from the Redis queues of distributed mode (needs DDPM_REDIS_URL); "
        "see docs/distributed.md.",
        model_help="model to load and serve (folder, PRESET:WEIGHTS or hf:REPO; NAME=REF names it); "
        "repeatable",
    )
    p.add_argument("--name", help="consumer name, unique among the workers (default: HOST-PID)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    return p


FLAGS = {  # setting: flag
    "models": "--model",
    "device": "--device",
    "worker_name": "--name",
    "worker_metrics_port": "--metrics-port",
}


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given on top."""
    return launch.settings_with(**launch.flag_values(args, FLAGS))


def main(argv: list[str] | None = None) -> None:
    settings = launch.start("ddpm-worker", build_parser().parse_args(argv), FLAGS)
    if not settings.redis_url:
        sys.exit("ddpm-worker: DDPM_REDIS_URL is not set; a worker takes its jobs from Redis")

    with contextlib.ExitStack() as cleanup:
        metrics = None
        port = settings.worker_metrics_port
        if port is not None:  # listen now: a taken port fails before loading
            try:
                metrics = metrics_server(settings)
            except OSError as e:
                launch.cannot_listen("ddpm-worker", settings.host, port, e, " for /metrics")
            cleanup.callback(metrics.server_close)

        from app.engine import threads
        from app.jobs.redis_connect import sync_client
        from app.loading import load_models
        from app.worker.worker import Worker, default_name

        threads.confine()  # before any torch work: only the engine threads compute in parallel
        # Until the engines have warmed up, SIGTERM or Ctrl-C (a pod stopped while its models load or
        # compile) ends the process at once: nothing is claimed yet, and as PID 1 in a container a SIGTERM
        # with no handler is ignored, so the pod would wait out its whole grace period before SIGKILL.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stopped_while_starting)
        try:
            checkpoints = load_models(settings)
        except Exception as e:  # a bad model reference: say which, and stop
            sys.exit(f"ddpm-worker: could not load the models: {e}")
        name = settings.worker_name or default_name()
        worker = Worker(settings, checkpoints, sync_client(settings.redis_url), name=name)

        def serving() -> None:  # from now on a signal winds the worker down: its jobs finish or go back
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: worker.stop())

        if metrics is not None:
            serve_metrics(metrics)
            cleanup.callback(metrics.shutdown)  # first: stop answering, then close
        worker.run(on_started=serving)
    if worker.engine_died:
        sys.exit("ddpm-worker: an engine thread died or hung (see the log); its jobs were handed back")


def stopped_while_starting(signum: int, _frame: object) -> None:
    raise SystemExit(f"ddpm-worker: stopped by {signal.Signals(signum).name} before it started serving")


def serve_metrics(server: Any) -> Any:
    """Prometheus `/metrics` answered on `server` (a `metrics_server`) from a daemon thread; the server
    (`.server_address`, `.shutdown()`)."""
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def metrics_server(settings: Settings) -> Any:
    """A Prometheus `/metrics` server listening on `worker_metrics_port`, bound to `host` (DDPM_HOST:
    loopback by default, as the API; the image sets 0.0.0.0), that answers once `serve_metrics` runs it:
    what `prometheus_client.start_http_server` builds, without starting it. Raises OSError."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    port = settings.worker_metrics_port
    infos = socket.getaddrinfo(settings.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]  # as prometheus_client picks the address family

    class Server(ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """No access log (as prometheus_client's)."""

    return make_server(sockaddr[0], port, make_wsgi_app(), Server, handler_class=QuietHandler)
