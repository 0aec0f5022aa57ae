"""`ddpm-serve`: run the HTTP service with uvicorn (API + in-process engines, or API only with Redis).

Flags override `DDPM_*` environment variables; `--help` lists every variable with its default,
generated from `Settings`, so the two never drift apart.

Start-up, in this order, each failure one line on stderr (app/launch.py): the settings (exit 1, one line
per invalid variable or flag; unknown `DDPM_*` variables are warned about), then the listening socket
(exit 3, `STARTUP_FAILURE`: `ddpm-serve: cannot listen on 127.0.0.1:8000: address already in use`), then
the models (exit 1), so a port that is taken fails at once, not after minutes of loading. The socket
listens from then on: connections made while the models load wait, and are answered once uvicorn runs.
Exit 3 too when the app's own start-up fails (logged by uvicorn).

Limits (constants below): idle keep-alive connections closed after KEEP_ALIVE_SECONDS; no cap on
connections (below), and no timeout for a slow request body: the reverse proxy in front limits
connections per client and enforces body timeouts (docs/deployment.md). X-Forwarded-For is believed
only from the proxies that uvicorn's FORWARDED_ALLOW_IPS variable names (none by default).

SIGTERM (or Ctrl-C): uvicorn stops accepting connections and lets the requests in flight finish (up to
`GRACEFUL_SHUTDOWN_SECONDS`). Open `/stream` connections would hold that until their jobs end, so
first every stream is ended with a `shutdown` event (app/api/sse.py), which tells its client to resume
with Last-Event-ID elsewhere. Then the engines stop (embedded) and the process exits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from app import launch
from app.settings import Settings

if TYPE_CHECKING:
    import socket

STARTUP_FAILURE = launch.STARTUP_FAILURE  # 3, uvicorn's exit status when the server did not start
GRACEFUL_SHUTDOWN_SECONDS = 10  # for requests in flight at SIGTERM; open streams end at once (below)
# No `limit_concurrency`: uvicorn would count every open connection, /stream's and the POSTs waiting with
# ?wait=true (hours, for long jobs) among them, and past the cap answer everything 503 in plain text, the
# kubelet's /healthz too (a restart that ends every stream). Slow bodies and connection floods are the
# reverse proxy's to limit, per client (docs/deployment.md).
# Seconds an idle keep-alive connection stays open between requests (uvicorn's default, made explicit).
# A proxy that reuses upstream connections must close its idle ones sooner (docs/deployment.md). uvicorn
# has no timeout for reading a body: the proxy's job.
KEEP_ALIVE_SECONDS = 5
# uvicorn's own variable: the proxies (comma-separated addresses or networks, or *) whose X-Forwarded-For
# and X-Forwarded-Proto are believed. Unset or empty: none are, not even 127.0.0.1 (uvicorn's default),
# so the client address (per-address /stream limits) is the connection's, never a header's.
FORWARDED_ALLOW_IPS = "FORWARDED_ALLOW_IPS"


def build_parser() -> argparse.ArgumentParser:
    p = launch.parser(
        "ddpm-serve",
        "Serve DDPM sampling over HTTP (OpenAPI docs at /docs).",
        model_help="model to load (folder, PRESET:WEIGHTS or hf:REPO; NAME=REF names it); repeatable, the "
        "first is the default",
    )
    p.add_argument("--host", help="address to listen on")
    p.add_argument("--port", type=int, help="TCP port")
    return p


FLAGS = {"models": "--model", "host": "--host", "port": "--port", "device": "--device"}  # setting: flag


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given on top."""
    return launch.settings_with(**launch.flag_values(args, FLAGS))


def main(argv: list[str] | None = None) -> None:
    settings = launch.start("ddpm-serve", build_parser().parse_args(argv), FLAGS)
    sockets = launch.listen("ddpm-serve", settings.host, settings.port)  # before the slow part
    try:
        _serve(settings, sockets)
    finally:  # uvicorn closes them when it stops; not if it never ran
        for sock in sockets:
            sock.close()


def _serve(settings: Settings, sockets: list[socket.socket]) -> None:
    """Load the models (embedded), then run uvicorn on `sockets` until it stops."""
    from app.api import create_app

    checkpoints = None
    if not settings.redis_url:  # embedded: load before uvicorn, so a bad model is one line, not its traceback
        from app.engine import threads
        from app.loading import load_models
        from app.nets import CheckpointError

        threads.confine()  # before any torch work: only the engine threads compute in parallel
        try:
            checkpoints = load_models(settings)
        except (CheckpointError, ValueError, OSError) as e:
            sys.exit(f"ddpm-serve: {e}")
    app = create_app(settings, checkpoints=checkpoints)
    server = draining_server(uvicorn_config(app, settings))
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run does
        server.run(sockets=sockets)
    if not server.started:  # the app's start-up failed (logged)
        sys.exit(STARTUP_FAILURE)


def uvicorn_config(app: Any, settings: Settings, environ: Mapping[str, str] | None = None) -> Any:
    """uvicorn's `Config` for serving `app`: idle keep-alive connections closed after KEEP_ALIVE_SECONDS,
    and X-Forwarded-* headers believed only from the proxies that `FORWARDED_ALLOW_IPS` (in `environ`)
    names."""
    import uvicorn

    trusted = (os.environ if environ is None else environ).get(FORWARDED_ALLOW_IPS, "").strip()
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        backlog=launch.BACKLOG,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
    )


def draining_server(config: Any) -> Any:
    """A uvicorn `Server` for `config` (whose app is ours) that ends the app's open streams as its
    shutdown starts, before it waits for the connections in flight: uvicorn tells the app nothing until
    every connection has closed. Run on sockets of ours, it logs the address as uvicorn does on its own."""
    import logging

    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if sockets and self.started:  # uvicorn logs the address only of sockets it bound itself
                scheme = "https" if self.config.is_ssl else "http"
                port = sockets[0].getsockname()[1]
                logging.getLogger("uvicorn.error").info(
                    "Uvicorn running on %s://%s (Press CTRL+C to quit)",
                    scheme,
                    launch.address(self.config.host, port),
                )

        async def shutdown(self, sockets: Any = None) -> None:
            self.config.app.state.draining.set()
            await super().shutdown(sockets=sockets)

    return DrainingServer(config)
