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
import logging
import sys
import textwrap
from typing import Any

from pydantic import ValidationError

from app.settings import Settings

STARTUP_FAILURE = 3  # uvicorn's exit status when the server did not start
GRACEFUL_SHUTDOWN_SECONDS = 10  # for requests in flight at SIGTERM; open streams end at once (below)


def _settings_help() -> str:
    lines = ["environment (flags take precedence):"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default
        shown = "none" if default in (None, []) else default
        text = f"{field.description} (default: {shown})"
        lines.append(
            textwrap.fill(text, 100, initial_indent=f"  DDPM_{name.upper():<22} ", subsequent_indent=" " * 30)
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddpm-serve",
        description="Serve DDPM sampling over HTTP (OpenAPI docs at /docs).",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="REF",
        help="model to load (folder, PRESET:WEIGHTS or hf:REPO); repeatable, the first is the default",
    )
    p.add_argument("--host", help="address to listen on")
    p.add_argument("--port", type=int, help="TCP port")
    p.add_argument("--device", help="torch device: auto, cpu, cuda, cuda:1, …")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given on top."""
    overrides = {"models": args.model, "host": args.host, "port": args.port, "device": args.device}
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ValidationError as e:
        sys.exit(f"ddpm-serve: invalid settings\n{e}")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    import uvicorn

    from app.api import create_app

    app = create_app(settings)
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
