"""Settings from DDPM_* variables: the defaults operators rely on and the combinations refused at start-up."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.cli import BUNDLED_MODEL
from app.jobs import MemoryJobStore, make_store
from app.settings import Settings

KEY = "k" * 16


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("DDPM_"):
            monkeypatch.delenv(name)


def test_defaults_are_the_documented_ones():
    s = Settings()
    assert (s.host, s.port, s.device, s.redis_url) == ("127.0.0.1", 8000, "auto", None)
    assert (s.max_batch, s.max_images, s.max_steps, s.max_queued_jobs) == (64, 64, None, 256)
    assert (s.max_body_bytes, s.job_ttl_seconds, s.heartbeat_seconds) == (10 * 1024 * 1024, 3600, 10)
    assert (s.max_streams_per_key, s.max_upload_pixels, s.log_level) == (8, 4096 * 4096, "info")
    assert s.api_keys == [] and not s.auth_enabled
    assert s.model_refs() == [str(BUNDLED_MODEL)]


@pytest.mark.parametrize("value", ["a, hf:org/b", '["a", "hf:org/b"]'])
def test_models_from_the_environment_comma_separated_or_json(monkeypatch, value):
    monkeypatch.setenv("DDPM_MODELS", value)
    assert Settings().model_refs() == ["a", "hf:org/b"]


def test_environment_variables_use_the_ddpm_prefix(monkeypatch):
    monkeypatch.setenv("DDPM_PORT", "9001")
    monkeypatch.setenv("DDPM_MAX_QUEUED_JOBS", "3")
    monkeypatch.setenv("DDPM_API_KEYS", f"{KEY},{'z' * 20}")
    s = Settings()
    assert (s.port, s.max_queued_jobs, s.api_keys, s.auth_enabled) == (9001, 3, [KEY, "z" * 20], True)


def test_short_api_keys_are_refused(monkeypatch):
    monkeypatch.setenv("DDPM_API_KEYS", "short-key")
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings()


def test_keys_and_redis_url_never_show_in_the_repr():
    s = Settings(api_keys=[KEY], redis_url="redis://:secret@host")
    assert KEY not in repr(s) and "secret" not in repr(s)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("heartbeat_seconds", 15),  # API.md promises a heartbeat at least every 15 s: 15 leaves no slack
        ("max_batch", 0),
        ("port", 70000),
        ("job_ttl_seconds", 0),
        ("log_level", "loud"),
        ("device", "gpu-please"),
        ("api_keys", [KEY, KEY]),
    ],
)
def test_unsafe_or_meaningless_values_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_auto_device_resolves_to_a_real_device():
    assert Settings(device="auto").resolved_device() in ("cpu", "cuda")
    assert Settings(device="cpu").resolved_device() == "cpu"


def test_redis_url_selects_the_redis_store():
    from app.jobs.redis_store import RedisJobStore

    assert isinstance(make_store(Settings(redis_url="redis://localhost:6379/0")), RedisJobStore)
    assert isinstance(make_store(Settings()), MemoryJobStore)


def test_a_redis_url_that_cannot_be_parsed_is_refused_and_an_empty_one_is_embedded():
    for url in ("notaurl", "redis://host:port/0"):
        with pytest.raises(ValidationError, match="not a Redis URL"):
            Settings(redis_url=url)
    assert Settings(redis_url="").redis_url is None and Settings(redis_url=" ").redis_url is None
    assert Settings(redis_url="unix:///run/redis.sock").redis_url == "unix:///run/redis.sock"


def test_an_engine_device_this_machine_lacks_is_one_value_error(monkeypatch):
    """Checked before any model loads (app/loading.py), so ddpm-serve and ddpm-worker stop in one line."""
    import torch

    with pytest.raises(ValueError, match=r"DDPM_DEVICE cuda:64: this machine has \d+ CUDA device\(s\)"):
        Settings(device="cuda:64").engine_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto is the CPU here
    with pytest.raises(ValueError, match="dtype float16 needs a CUDA device, the engine runs on cpu"):
        Settings(dtype="float16").engine_device()
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        Settings(cuda_graphs=True).engine_device()
    assert Settings().engine_device() == "cpu"


def test_a_reclaim_time_shorter_than_three_heartbeats_is_refused():
    # A live worker's claims would look idle after one late heartbeat, and its jobs would run twice.
    with pytest.raises(ValidationError, match="at least 3"):
        Settings(worker_heartbeat_seconds=5, reclaim_idle_seconds=10)
    assert Settings(worker_heartbeat_seconds=0.5, reclaim_idle_seconds=2).reclaim_idle_seconds == 2


def test_engine_options_reach_the_engine_from_the_environment(monkeypatch):
    from app.engine.engine import POLICIES
    from app.engine.fastpath import FastPath

    s = Settings()
    assert s.engine_policy == "step" and s.fast_path() == FastPath()
    assert set(POLICIES) == {"step", "request", "serial"}
    monkeypatch.setenv("DDPM_ENGINE_POLICY", "serial")
    monkeypatch.setenv("DDPM_CHANNELS_LAST", "true")
    monkeypatch.setenv("DDPM_DTYPE", "bfloat16")
    monkeypatch.setenv("DDPM_COMPILE", "1")
    s = Settings()
    assert s.engine_policy == "serial"
    assert s.fast_path() == FastPath(channels_last=True, dtype="bfloat16", compile=True)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"engine_policy": "fifo"}, "engine_policy"),
        ({"dtype": "int8"}, "dtype"),
        ({"device": "cpu", "cuda_graphs": True}, "need a CUDA device, and device is cpu"),
        ({"device": "cpu", "dtype": "float16"}, "need a CUDA device, and device is cpu"),
    ],
)
def test_engine_options_the_device_cannot_run_are_refused(overrides, says):
    with pytest.raises(ValidationError, match=says):
        Settings(**overrides)


def test_compose_s_dotenv_at_the_repo_root_is_not_read_and_breaks_nothing(monkeypatch, tmp_path):
    """`.env` (COMPOSE_PROFILES for `docker compose`) sits in the folder the services start from: the
    settings read DDPM_* from the environment only, never a .env file, so neither it nor a DDPM_ line in
    one changes or fails them; `ddpm-serve --help` works from the repo root."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    assert "COMPOSE_PROFILES=" in (repo / ".env").read_text()
    assert Settings.model_config.get("env_file") is None
    monkeypatch.chdir(repo)
    assert Settings() == Settings.model_validate({})  # the defaults, from the repo root
    (tmp_path / ".env").write_text("COMPOSE_PROFILES=cpu\nDDPM_PORT=1\nDDPM_API_KEYS=short\n")
    monkeypatch.chdir(tmp_path)
    assert Settings().port == 8000 and Settings().api_keys == []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DDPM_", "COMPOSE_"))}
    command = [sys.executable, "-c", "from app.cli import serve_main; serve_main()", "--help"]
    run = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert "usage: ddpm-serve" in run.stdout and "DDPM_WORKER_GRACE_SECONDS" in run.stdout
