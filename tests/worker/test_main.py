"""`ddpm-worker`: flags over DDPM_* variables, and a clear refusal without Redis."""

from __future__ import annotations

import pytest

from app.worker.main import build_parser, main, settings_from


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
