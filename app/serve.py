"""`ddpm-serve`: run the HTTP service with uvicorn (API + in-process engines, or API only with Redis).

Flags override `DDPM_*` environment variables; `--help` lists every variable with its default,
generated from `Settings`, so the two never drift apart.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from pydantic import ValidationError

from app.settings import Settings

GRACEFUL_SHUTDOWN_SECONDS = 10  # open SSE streams would otherwise hold the shutdown until their jobs end


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
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
