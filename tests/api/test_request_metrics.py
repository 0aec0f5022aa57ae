"""ddpm_http_request_duration_seconds on a real uvicorn server, fed by raw sockets: the labels stay
bounded whatever a client sends, and a client that leaves mid-upload is not a server error."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.api.conftest import Live, live_server, metric, server_settings

NAME = "ddpm_http_request_duration_seconds_count"


@pytest.fixture(scope="module")
def live(model_dirs) -> Iterator[Live]:
    with live_server(server_settings(model_dirs[:1])) as server:
        yield server


def connect(live: Live) -> socket.socket:
    url = urlsplit(live.url)
    return socket.create_connection((url.hostname, url.port), timeout=10)


def exchange(live: Live, request: bytes) -> bytes:
    """Send `request` on a new connection; the status line of the answer."""
    with connect(live) as sock:
        sock.sendall(request)
        return sock.makefile("rb").readline()


def scrape(live: Live) -> str:
    with live.client() as client:
        return client.get("/metrics").raise_for_status().text


def test_a_made_up_method_counts_as_other_and_adds_no_series(live):
    before = scrape(live)
    other_before = metric(before, NAME, method="other")
    for i in range(3):
        request = f"FOO{i} /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        status_line = exchange(live, request.encode())
        assert status_line.startswith(b"HTTP/1.1 "), status_line  # uvicorn (h11) took it as a request
    text = scrape(live)
    assert not [line for line in text.splitlines() if 'method="FOO' in line]
    assert metric(text, NAME, method="other") == other_before + 3
    methods = {line.split('method="')[1].split('"')[0] for line in text.splitlines() if 'method="' in line}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "other"}


def test_a_client_that_leaves_mid_upload_is_counted_as_499_not_500(live):
    labels = {"route": "unmatched", "method": "POST"}
    before = scrape(live)
    closed_before = metric(before, NAME, status="499", **labels)
    errors_before = metric(before, NAME, status="500")
    with connect(live) as sock:
        head = b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        sock.sendall(head + b'{"n": 1, ')  # 9 of the 1000 bytes announced, then the client is gone
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while metric(text := scrape(live), NAME, status="499", **labels) == closed_before:
        assert time.monotonic() < deadline, "the abandoned upload was never observed"
        time.sleep(0.05)
    assert metric(text, NAME, status="499", **labels) == closed_before + 1
    assert metric(text, NAME, status="500") == errors_before
