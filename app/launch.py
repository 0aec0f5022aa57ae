"""What the two long-running entry points (`ddpm-serve`, `ddpm-worker`) share: the --model and --device
flags, an epilog listing every `DDPM_*` variable (generated from `Settings`, so the two never drift
apart), settings from the environment with the given flags on top, and logging."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from typing import Any

from pydantic import ValidationError

from app.settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def settings_help() -> str:
    """Every DDPM_* variable with its description and default, for an argparse epilog."""
    lines = ["environment (flags take precedence):"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default
        shown = "none" if default in (None, []) else default
        text = f"{field.description} (default: {shown})"
        lines.append(
            textwrap.fill(text, 100, initial_indent=f"  DDPM_{name.upper():<22} ", subsequent_indent=" " * 30)
        )
    return "\n".join(lines)


def parser(prog: str, description: str, *, model_help: str) -> argparse.ArgumentParser:
    """A parser with --model (repeatable) and --device, and the environment listed after the flags."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", action="append", metavar="REF", help=model_help)
    p.add_argument("--device", help="torch device: auto, cpu, cuda, cuda:1, …")
    return p


def settings_with(**flags: Any) -> Settings:
    """Settings from the environment, with the flags that were given (not None) on top."""
    return Settings(**{k: v for k, v in flags.items() if v is not None})


def start(prog: str, **flags: Any) -> Settings:
    """`settings_with(**flags)`, or exit with the validation errors; then logging at the set level."""
    try:
        settings = settings_with(**flags)
    except ValidationError as e:
        sys.exit(f"{prog}: invalid settings\n{e}")
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    return settings
