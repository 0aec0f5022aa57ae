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


def test_bad_settings_and_redis_stop_start_up_with_a_message(monkeypatch):
    monkeypatch.setenv("DDPM_API_KEYS", "short")
    with pytest.raises(SystemExit, match="16 characters"):
        main([])
    monkeypatch.delenv("DDPM_API_KEYS")
    monkeypatch.setenv("DDPM_REDIS_URL", "redis://localhost:6379")
    with pytest.raises(SystemExit, match="not implemented yet"):
        main([])
