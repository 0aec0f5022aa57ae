"""`ddpm-serve`: flags over DDPM_* variables, a --help that lists every setting, and start-up failures
in one line each (the shared parts in detail: tests/test_launch.py)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from app.serve import STARTUP_FAILURE, build_parser, main, settings_from
from app.settings import Settings
from tests.redis_server import free_port

COMMAND = [sys.executable, "-c", "from app.cli import serve_main; serve_main()"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("DDPM_"):
            monkeypatch.delenv(name)


def test_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"DDPM_{name.upper()}" in text
    assert "(default: 256)" in text and "--model REF" in text


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("DDPM_PORT", "9000")
    monkeypatch.setenv("DDPM_MODELS", "env-model")
    monkeypatch.setenv("DDPM_MAX_BATCH", "8")
    args = build_parser().parse_args(
        ["--model", "a", "--model", "hf:org/b", "--port", "9100", "--device", "cpu"]
    )
    settings = settings_from(args)
    assert (settings.models, settings.port, settings.device) == (["a", "hf:org/b"], 9100, "cpu")
    assert settings.max_batch == 8  # no flag: the environment's
    assert settings_from(build_parser().parse_args([])).models == ["env-model"]


def test_bad_settings_stop_start_up_with_a_message(monkeypatch):
    monkeypatch.setenv("DDPM_API_KEYS", "short")
    with pytest.raises(SystemExit, match="16 characters"):
        main([])
    monkeypatch.delenv("DDPM_API_KEYS")
    monkeypatch.setenv("DDPM_RECLAIM_IDLE_SECONDS", "10")  # fewer than 3 heartbeats of 5 s
    with pytest.raises(SystemExit, match="at least 3"):
        main([])


def test_a_model_that_does_not_load_stops_start_up_with_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    for ref in (str(tmp_path / "no-such-model"), str(tmp_path)):
        with pytest.raises(SystemExit) as exit_:
            main(["--model", ref, "--port", str(free_port())])  # exits before uvicorn runs
        message = str(exit_.value.code)
        assert message.startswith("ddpm-serve: ") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err


def test_a_device_this_machine_lacks_stops_start_up_with_one_line(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flags, env in (
        (["--device", "cuda"], {}),
        ([], {"DDPM_DTYPE": "float16"}),
        ([], {"DDPM_CUDA_GRAPHS": "1"}),
    ):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as exit_:
            main([*flags, "--port", str(free_port())])  # exits before uvicorn runs
        for name in env:
            monkeypatch.delenv(name)
        message = str(exit_.value.code)
        assert message.startswith("ddpm-serve: ") and "CUDA" in message and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err


def test_a_taken_port_stops_start_up_at_once_with_one_line():
    """Before any model loads: were the models loaded first, this one (which does not exist) would be
    the error."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [*COMMAND, "--port", str(port), "--model", "/no/such/model"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == STARTUP_FAILURE == 3, run.stderr
    assert run.stderr == f"ddpm-serve: cannot listen on 127.0.0.1:{port}: address already in use\n"


def test_a_host_that_is_not_this_machine_s_stops_start_up_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--host", "203.0.113.7", "--model", str(tmp_path / "no-such-model")])
    assert exit_.value.code == STARTUP_FAILURE
    err = capsys.readouterr().err
    assert err == "ddpm-serve: cannot listen on 203.0.113.7:8000: cannot assign requested address\n"


def test_invalid_settings_stop_start_up_with_one_line_each_naming_the_variable_or_flag(monkeypatch):
    monkeypatch.setenv("DDPM_MAX_BATCH", "0")
    monkeypatch.setenv("DDPM_API_KEYS", "a-short-secret")
    monkeypatch.setenv("DDPM_PORT", "abc")  # the flag is used instead
    run = subprocess.run([*COMMAND, "--port", "70000"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        "ddpm-serve: --port 70000: Input should be less than or equal to 65535",
        "ddpm-serve: DDPM_MAX_BATCH=0: Input should be greater than or equal to 1",
        "ddpm-serve: DDPM_API_KEYS: API keys must be at least 16 characters; "
        "key(s) at position 0 are shorter",
    ]
    assert "a-short-secret" not in run.stderr


@pytest.mark.service
def test_the_serve_command_starts_a_server_that_answers(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from tests.api.conftest import save_tiny

    model = save_tiny(tmp_path / "tiny", timesteps=10, variance_type="fixed_large")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-c", "from app.cli import serve_main; serve_main()"]
    args = ["--model", str(model), "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "ddpm-serve did not answer within 60 s"
                time.sleep(0.1)
        assert ready.status_code == 200 and ready.json()["models"] == ["tiny"]
        job = httpx.post(f"http://127.0.0.1:{port}/sample?wait=true", json={"steps": 2}, timeout=30).json()
        assert job["status"] == "succeeded"
    finally:
        process.terminate()
        process.wait(20)
    # On sockets bound before the models loaded, the address is logged as uvicorn logs its own.
    assert f"Uvicorn running on http://127.0.0.1:{port} (Press CTRL+C to quit)" in process.stdout.read()


@pytest.mark.service
def test_sigterm_ends_open_streams_at_once_and_lets_requests_in_flight_finish(tmp_path):
    """SIGTERM: every open /stream ends within a moment with a `shutdown` event (no id: the client's
    Last-Event-ID stays that of the last event it got), a request whose body is still arriving is
    answered, and the process exits; none of it waits for the running job or the graceful timeout."""
    import json
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from app.serve import GRACEFUL_SHUTDOWN_SECONDS
    from tests.api.conftest import read_sse, save_tiny

    model = save_tiny(tmp_path / "tiny", timesteps=1000, variance_type="fixed_large")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "serve.log"
    command = [sys.executable, "-c", "from app.cli import serve_main; serve_main()"]
    args = ["--model", str(model), "--port", str(port), "--device", "cpu"]
    with log.open("wb") as out:
        process = subprocess.Popen([*command, *args], stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "ddpm-serve was not ready within 60 s"
            time.sleep(0.1)
        # A long job: 1000 steps of 8 images is tens of seconds here, far past the graceful timeout.
        job = httpx.post(f"{base}/sample", json={"n": 8, "stream_every": 5}, timeout=10).json()
        body = json.dumps({"steps": 2}).encode()
        head = (
            f"POST /sample HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        messages, signalled, ended = [], 0.0, 0.0
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as slow,
            httpx.stream("GET", f"{base}/stream/{job['id']}", timeout=30) as stream,
        ):
            for message in read_sse(stream):
                messages.append(message)
                if not signalled:  # the job runs and the stream is live: a request starts, then SIGTERM
                    slow.sendall(head + body[:5])
                    time.sleep(0.5)  # the server has read the headers: the request is in flight
                    process.send_signal(signal.SIGTERM)
                    signalled = time.monotonic()
            ended = time.monotonic()
            slow.sendall(body[5:])  # the rest of the body, after the streams have ended
            reply = b""
            while chunk := slow.recv(65536):
                reply += chunk
        code = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert messages[0].event == "progress" and messages[-1].event == "shutdown", (messages[-3:], text)
    assert messages[-1].id is None and messages[-1].data["code"] == "server_shutdown"
    assert all(m.event == "progress" and m.id is not None for m in messages[:-1])
    assert ended - signalled < GRACEFUL_SHUTDOWN_SECONDS / 2, (ended - signalled, text)
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 202 Accepted", reply[:500]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["status"] == "queued"
    assert code == -signal.SIGTERM and "Finished server process" in text, text[-3000:]
