"""`ddpm-serve`: flags over DDPM_* variables, and a --help that lists every setting."""

from __future__ import annotations

import pytest

from app.serve import build_parser, main, settings_from
from app.settings import Settings


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
