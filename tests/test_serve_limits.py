"""The uvicorn configuration ddpm-serve runs with (app/serve.py `uvicorn_config`), on a real server: no
cap on connections (streams and waits are long; a cap would lock the health probe out), idle keep-alive
connections closed, and X-Forwarded-For believed only from proxies named in FORWARDED_ALLOW_IPS."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytest

from app import serve
from app.settings import Settings


async def _echo(scope, receive, send) -> None:
    """Reads the whole body, then answers the client address uvicorn gave the app, as JSON."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body = json.dumps({"client": scope["client"][0]}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def _server(environ: Mapping[str, str] | None = None) -> Iterator[int]:
    settings = Settings(host="127.0.0.1", port=1, log_level="warning")
    config = serve.uvicorn_config(_echo, settings, environ if environ is not None else {})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    import uvicorn

    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def _request(port: int, headers: str = "", *, keep_alive: bool = False) -> tuple[bytes, socket.socket]:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection = "keep-alive" if keep_alive else "close"
    conn.sendall(f"GET / HTTP/1.1\r\nHost: x\r\nConnection: {connection}\r\n{headers}\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        reply += chunk
    return reply, conn


def test_the_config_has_the_limits():
    config = serve.uvicorn_config(_echo, Settings(), {})
    assert config.limit_concurrency is None  # long streams and waits must not lock /healthz out
    assert config.timeout_keep_alive == serve.KEEP_ALIVE_SECONDS > 0
    assert config.proxy_headers is False  # nothing believed without FORWARDED_ALLOW_IPS


def test_an_idle_keep_alive_connection_is_closed(monkeypatch):
    monkeypatch.setattr(serve, "KEEP_ALIVE_SECONDS", 1)
    with _server() as port:
        reply, conn = _request(port, keep_alive=True)
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        started = time.monotonic()
        with conn:
            conn.settimeout(4)
            assert conn.recv(1) == b""  # closed by the server, not timed out here
        assert time.monotonic() - started < 3


FORWARDED = "X-Forwarded-For: 203.0.113.7\r\n"


def _client_seen(port: int) -> str:
    reply, conn = _request(port, FORWARDED)
    conn.close()
    return json.loads(reply.partition(b"\r\n\r\n")[2])["client"]


@pytest.mark.parametrize("environ", [{}, {"FORWARDED_ALLOW_IPS": ""}, {"FORWARDED_ALLOW_IPS": "10.0.0.0/8"}])
def test_x_forwarded_for_is_not_believed_by_default_nor_from_an_untrusted_proxy(environ):
    with _server(environ) as port:  # a client on 127.0.0.1, trusted by uvicorn's own default
        assert _client_seen(port) == "127.0.0.1"


def test_x_forwarded_for_is_believed_from_the_proxies_forwarded_allow_ips_names():
    with _server({"FORWARDED_ALLOW_IPS": "127.0.0.1"}) as port:
        assert _client_seen(port) == "203.0.113.7"


def test_forwarded_allow_ips_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "10.0.0.0/8, 127.0.0.1")
    config = serve.uvicorn_config(_echo, Settings())
    assert config.proxy_headers is True and config.forwarded_allow_ips == "10.0.0.0/8, 127.0.0.1"
