"""What the two long-running entry points (`ddpm-serve`, `ddpm-worker`) share: the --model and --device
flags, an epilog listing every `DDPM_*` variable (generated from `Settings`, so the two never drift
apart), settings from the environment with the given flags on top, logging, and their listening sockets.

Start-up problems are short messages on stderr, each naming what to fix, before any model is loaded:

- invalid settings: one line per problem, naming the variable or flag and its value (a secret's value is
  not shown), e.g. `ddpm-serve: DDPM_PORT=abc: Input should be a valid integer, …`; exit status 1;
- an address that cannot be listened on (the port is taken, the host is not this machine's):
  `ddpm-serve: cannot listen on 127.0.0.1:8000: address already in use`; exit status 3
  (`STARTUP_FAILURE`, uvicorn's own status when it cannot bind);
- a Redis URL whose password is still the Secret template's placeholder (k8s/base/secret.template.yaml,
  `REDIS_PASSWORD: "CHANGEME"`): `ddpm-serve: DDPM_REDIS_URL: the Redis password is the placeholder …`;
  exit status 1, as an API key left at its placeholder is refused by the settings (too short);
- a `DDPM_*` variable that is no setting (a typo) is not fatal: a warning names it, with the closest
  setting, once logging is configured.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import shlex
import socket
import sys
import textwrap
from collections.abc import Mapping
from typing import Any, NoReturn

from pydantic import ValidationError

from app.settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
STARTUP_FAILURE = 3  # could not listen (as uvicorn exits when it cannot bind)
BACKLOG = 2048  # uvicorn's default listen backlog
# DDPM_* variables that are no settings but are read elsewhere, by the client side (`ddpm remote`,
# app.client): a shell may set them for a client and start a server too.
CLIENT_VARIABLES = frozenset({"DDPM_URL", "DDPM_API_KEY"})
SHOWN_VALUE_CHARS = 80  # a longer value is cut in error lines
# The Redis password of k8s/base/secret.template.yaml (and its API key's spelling), compared without regard
# to case: an unedited copy of the template must stop start-up, not run with a password anyone can read.
REDIS_PASSWORD_PLACEHOLDERS = frozenset({"changeme", "change-me"})

log = logging.getLogger(__name__)


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


def flag_values(args: argparse.Namespace, flags: Mapping[str, str]) -> dict[str, Any]:
    """{setting: its flag's value (None: not given)} for `flags`, {setting: flag, e.g. "--metrics-port"}."""
    return {setting: getattr(args, flag.lstrip("-").replace("-", "_")) for setting, flag in flags.items()}


def settings_with(**flags: Any) -> Settings:
    """Settings from the environment, with the flags that were given (not None) on top."""
    return Settings(**{k: v for k, v in flags.items() if v is not None})


def start(prog: str, args: argparse.Namespace, flags: Mapping[str, str]) -> Settings:
    """Settings from the environment with the given `flags` ({setting: flag}) of `args` on top, or exit
    with one line per problem; then logging at the set level, and a warning per unknown DDPM_* variable."""
    values = flag_values(args, flags)
    try:
        settings = settings_with(**values)
    except ValidationError as e:
        given = {setting: flags[setting] for setting, value in values.items() if value is not None}
        sys.exit("\n".join(f"{prog}: {line}" for line in error_lines(e, given)))
    placeholder = redis_placeholder_line(settings.redis_url)
    if placeholder:
        sys.exit(f"{prog}: {placeholder}")
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    for warning in unknown_variables(os.environ, settings):
        log.warning("%s", warning)
    return settings


def error_lines(error: ValidationError, given: Mapping[str, str]) -> list[str]:
    """One line per problem of `error`, naming its flag (`given`: {setting: flag} of the flags that were
    given) or else its DDPM_* variable, with the value unless the setting is a secret."""
    fields = Settings.model_fields

    def source(setting: str) -> str:
        return given.get(setting, f"DDPM_{setting.upper()}")

    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        loc = problem["loc"]
        if not loc or loc[0] not in fields:  # a rule across settings: name those its message mentions
            found = ((m.start(), s) for s in fields if (m := re.search(rf"\b{s}\b", message)))
            mentioned = [source(s) for _, s in sorted(found)]
            lines.append(f"{message} ({', '.join(mentioned)})" if mentioned else message)
            continue
        setting, where = str(loc[0]), "".join(f"[{part}]" for part in loc[1:])
        name = source(setting) + where
        if fields[setting].repr is False:  # a secret (API keys, a Redis URL with its password)
            lines.append(f"{name}: {message}")
            continue
        value = problem["input"]
        if setting in given and not where and isinstance(value, list):  # a repeated flag: each value
            shown = " ".join(f"{name} {_shown(item)}" for item in value)
        else:
            shown = f"{name}{' ' if setting in given and not where else '='}{_shown(value)}"
        lines.append(f"{shown}: {message}")
    return lines


def redis_placeholder_line(redis_url: str | None) -> str | None:
    """The start-up error for a Redis URL whose password is the Secret template's placeholder, else None.
    Neither the URL nor the password is shown."""
    if not redis_url:
        return None
    from redis.connection import parse_url

    password = parse_url(redis_url).get("password")  # also from ?password=; percent-decoded
    if password is None or password.strip().lower() not in REDIS_PASSWORD_PLACEHOLDERS:
        return None
    return (
        "DDPM_REDIS_URL: the Redis password is the placeholder of k8s/base/secret.template.yaml; set "
        "REDIS_PASSWORD in the Secret ddpm-secrets to a random one (docs/deployment.md) and restart Redis too"
    )


def _shown(value: Any) -> str:
    text = shlex.quote(value) if isinstance(value, str) else str(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[: SHOWN_VALUE_CHARS - 1] + "…"


def unknown_variables(environ: Mapping[str, str], settings: Settings) -> list[str]:
    """A warning for each DDPM_* variable of `environ` that no setting reads (matched without regard to
    case, as Settings reads them), with the closest setting when one is close."""
    suffixes = [name.upper() for name in Settings.model_fields]
    known = [f"DDPM_{suffix}" for suffix in suffixes]
    warnings = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("DDPM_") or upper in known:
            continue
        # The client's key is no server setting, but set where the server has no keys it may be a typo
        # of DDPM_API_KEYS, which would leave the API open.
        if upper in CLIENT_VARIABLES and not (upper == "DDPM_API_KEY" and not settings.api_keys):
            continue
        close = closest(upper.removeprefix("DDPM_"), suffixes)
        hint = f" (did you mean DDPM_{close}?)" if close else ""
        warnings.append(f"ignoring unknown environment variable {name}{hint}")
    return warnings


def closest(name: str, names: list[str]) -> str | None:
    """The one of `names` that `name` most likely misspells: the only one it begins (a cut name:
    WORKER_GRACE), else the most similar, if similar enough."""
    extended = [known for known in names if known.startswith(name)]
    if len(extended) == 1:
        return extended[0]
    close = difflib.get_close_matches(name, names, n=1)
    return close[0] if close else None


def address(host: str, port: int) -> str:
    """`host:port` as a URL writes it (`[::1]:8000`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"


def cannot_listen(prog: str, host: str, port: int, error: OSError, what: str = "") -> NoReturn:
    """Exit with STARTUP_FAILURE and one line on stderr saying why `host:port` could not be listened on."""
    reason = (error.strerror or str(error)).lower()
    print(f"{prog}: cannot listen on {address(host, port)}{what}: {reason}", file=sys.stderr)
    sys.exit(STARTUP_FAILURE)


def listen(prog: str, host: str, port: int) -> list[socket.socket]:
    """Listening sockets for `host:port`, bound as uvicorn binds its own (asyncio's create_server: one
    per address `host` resolves to, SO_REUSEADDR, IPv6 ones IPv6-only), for `uvicorn.Server.run(sockets=)`;
    or exit as `cannot_listen`. Connections made before the server runs wait in the backlog."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            # Listen at once: a socket only bound (SO_REUSEADDR) would not keep another such one off the port.
            sock.listen(BACKLOG)
        if not sockets:
            raise OSError(f"getaddrinfo({host!r}) returned no address")
    except OSError as e:
        for sock in sockets:
            sock.close()
        cannot_listen(prog, host, port, e)
    return sockets
