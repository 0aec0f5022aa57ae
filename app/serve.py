"""`ddpm-serve`: run the HTTP service with uvicorn (API + in-process engines, or API only with Redis).

Flags override `DDPM_*` environment variables; `--help` lists every variable with its default,
generated from `Settings`, so the two never drift apart.

SIGTERM (or Ctrl-C): uvicorn stops accepting connections and lets the requests in flight finish (up to
`GRACEFUL_SHUTDOWN_SECONDS`). Open `/stream` connections would hold that until their jobs end, so
first every stream is ended with a `shutdown` event (app/api/sse.py), which tells its client to resume
with Last-Event-ID elsewhere. Then the engines stop (embedded) and the process exits.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from app import launch
from app.settings import Settings

STARTUP_FAILURE = 3  # uvicorn's exit status when the server did not start
GRACEFUL_SHUTDOWN_SECONDS = 10  # for requests in flight at SIGTERM; open streams end at once (below)


def build_parser() -> argparse.ArgumentParser:
    p = launch.parser(
        "ddpm-serve",
        "Serve DDPM sampling over HTTP (OpenAPI docs at /docs).",
        model_help="model to load (folder, PRESET:WEIGHTS or hf:REPO); repeatable, the first is the default",
    )
    p.add_argument("--host", help="address to listen on")
    p.add_argument("--port", type=int, help="TCP port")
    return p


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {"models": args.model, "host": args.host, "port": args.port, "device": args.device}


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given on top."""
    return launch.settings_with(**_flags(args))


def main(argv: list[str] | None = None) -> None:
    settings = launch.start("ddpm-serve", **_flags(build_parser().parse_args(argv)))

    import uvicorn

    from app.api import create_app

    checkpoints = None
    if not settings.redis_url:  # embedded: load before uvicorn, so a bad model is one line, not its traceback
        from app.loading import load_models
        from app.nets import CheckpointError

        try:
            checkpoints = load_models(settings)
        except (CheckpointError, ValueError, OSError) as e:
            sys.exit(f"ddpm-serve: {e}")
    app = create_app(settings, checkpoints=checkpoints)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = draining_server(config)
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run does
        server.run()
    if not server.started:  # it could not bind, or the app's start-up failed (both logged)
        sys.exit(STARTUP_FAILURE)


def draining_server(config: Any) -> Any:
    """A uvicorn `Server` for `config` (whose app is ours) that ends the app's open streams as its
    shutdown starts, before it waits for the connections in flight: uvicorn tells the app nothing until
    every connection has closed."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            self.config.app.state.draining.set()
            await super().shutdown(sockets=sockets)

    return DrainingServer(config)
