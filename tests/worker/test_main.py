"""`ddpm-worker`: flags over DDPM_* variables, a clear refusal without Redis, and start-up failures in
one line each, before any model loads."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from app.settings import Settings
from app.worker.main import build_parser, main, metrics_server, serve_metrics, settings_from
from tests.redis_server import free_port

COMMAND = [sys.executable, "-c", "from app.cli import worker_main; worker_main()"]
NO_REDIS = "redis://127.0.0.1:1/0"  # never reached: these workers stop before connecting


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("DDPM_"):
            monkeypatch.delenv(name)


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("DDPM_WORKER_NAME", "from-env")
    monkeypatch.setenv("DDPM_MODELS", "env-model")
    args = ["--model", "a", "--model", "b", "--device", "cpu", "--name", "gpu0", "--metrics-port", "9100"]
    settings = settings_from(build_parser().parse_args(args))
    assert (settings.models, settings.device, settings.worker_name) == (["a", "b"], "cpu", "gpu0")
    assert settings.worker_metrics_port == 9100
    assert settings_from(build_parser().parse_args([])).worker_name == "from-env"


def test_a_worker_without_redis_stops_with_a_message():
    with pytest.raises(SystemExit, match="DDPM_REDIS_URL is not set"):
        main(["--device", "cpu"])


def test_an_unloadable_model_stops_the_worker_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(SystemExit, match=r"could not load the models.*nowhere"):
        main(["--model", str(tmp_path / "nowhere"), "--device", "cpu"])


def test_a_taken_metrics_port_stops_the_worker_at_once_with_one_line(monkeypatch):
    """Before any model loads: were the models loaded first, this one (which does not exist) would be
    the error."""
    monkeypatch.setenv("DDPM_REDIS_URL", NO_REDIS)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--metrics-port", str(port), "--model", "/no/such/model"]
        run = subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    assert (
        run.stderr == f"ddpm-worker: cannot listen on 127.0.0.1:{port} for /metrics: address already in use\n"
    )


def test_a_metrics_host_that_is_not_this_machine_s_stops_the_worker_with_one_line(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("DDPM_REDIS_URL", NO_REDIS)
    monkeypatch.setenv("DDPM_HOST", "203.0.113.7")
    with pytest.raises(SystemExit) as exit_:
        main(["--metrics-port", "9100", "--model", str(tmp_path / "nowhere"), "--device", "cpu"])
    assert exit_.value.code == 3
    err = capsys.readouterr().err
    assert (
        err
        == "ddpm-worker: cannot listen on 203.0.113.7:9100 for /metrics: cannot assign requested address\n"
    )


def test_the_metrics_port_is_held_from_start_up_and_answers_once_served():
    import httpx

    settings = Settings(worker_metrics_port=free_port())
    server = metrics_server(settings)  # what the worker does before loading its models
    try:
        with pytest.raises(OSError):
            metrics_server(settings)  # the port is taken from now on
        assert serve_metrics(server) is server  # once the models are loaded
        reply = httpx.get(f"http://127.0.0.1:{settings.worker_metrics_port}/metrics", timeout=10)
        assert reply.status_code == 200 and "ddpm_" in reply.text
    finally:
        server.shutdown()
        server.server_close()


def test_invalid_settings_and_unknown_variables_are_one_line_each(monkeypatch):
    monkeypatch.setenv("DDPM_WORKER_HEARTBEAT_SECONDS", "soon")
    monkeypatch.setenv("DDPM_WORKER_GRACE", "10")  # a typo, warned about, not fatal
    run = subprocess.run([*COMMAND, "--metrics-port", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        "ddpm-worker: --metrics-port 0: Input should be greater than or equal to 1",
        "ddpm-worker: DDPM_WORKER_HEARTBEAT_SECONDS=soon: Input should be a valid number, "
        "unable to parse string as a number",
    ]
    monkeypatch.delenv("DDPM_WORKER_HEARTBEAT_SECONDS")
    run = subprocess.run(COMMAND, capture_output=True, text=True, timeout=120)  # no DDPM_REDIS_URL
    assert run.returncode == 1
    warning, refusal = run.stderr.splitlines()
    assert warning.endswith(
        " WARNING app.launch: ignoring unknown environment variable DDPM_WORKER_GRACE "
        "(did you mean DDPM_WORKER_GRACE_SECONDS?)"
    )
    assert refusal.startswith("ddpm-worker: DDPM_REDIS_URL is not set")


def assert_stops_at_once_on_sigterm(script: str, marker: str) -> None:
    """Run `script` (a worker made slow at some point of its start-up, where it prints `marker`) as a
    process, send it SIGTERM once it prints `marker`: it must end at once, exit 1, saying so."""
    env = {**os.environ, "DDPM_REDIS_URL": NO_REDIS}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    worker = subprocess.Popen([sys.executable, "-c", script], env=env, **pipes)
    try:
        assert worker.stdout.readline() == f"{marker}\n"
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=60)  # the scripts sleep 120 s where they are slow
    finally:
        worker.kill()
    assert worker.returncode == 1, (worker.returncode, err)
    assert err.strip().splitlines()[-1] == "ddpm-worker: stopped by SIGTERM before it started serving"


def test_sigterm_while_the_models_load_stops_the_worker_at_once():
    """A pod stopped during start-up: in a container the worker is PID 1, which ignores a SIGTERM that has
    no handler, so without one it would wait out the pod's whole grace period. Loading is made slow here."""
    slow_load = (
        "import time, app.loading\n"
        "def load_models(settings):\n"
        "    print('loading', flush=True)\n"
        "    time.sleep(120)\n"
        "app.loading.load_models = load_models\n"
        "from app.cli import worker_main\n"
        "worker_main()\n"
    )
    assert_stops_at_once_on_sigterm(slow_load, "loading")


def test_sigterm_while_the_engines_warm_up_stops_the_worker_at_once():
    """Warm-up (compiling, capturing CUDA graphs) can take minutes after the models load; until it ends
    nothing is claimed, and a SIGTERM ends the worker then too, rather than a flag nobody reads yet."""
    slow_warm_up = (
        "import time, app.loading, app.worker.worker as w\n"
        "from tests.tiny import tiny_checkpoint\n"
        "app.loading.load_models = lambda settings: {'tiny': tiny_checkpoint()}\n"
        "def start(self):\n"
        "    print('warming up', flush=True)\n"
        "    time.sleep(120)\n"
        "w.EnginePool.start = start\n"
        "from app.cli import worker_main\n"
        "worker_main()\n"
    )
    assert_stops_at_once_on_sigterm(slow_warm_up, "warming up")
