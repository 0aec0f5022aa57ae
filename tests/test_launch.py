"""app/launch.py, shared by `ddpm-serve` and `ddpm-worker`: one line per invalid setting naming its
variable or flag, a warning per unknown DDPM_* variable, and listening sockets that fail in one line.
The entry points' own start-ups, as processes: tests/test_serve.py and tests/worker/test_main.py."""

from __future__ import annotations

import logging
import socket

import pytest

from app import launch, serve
from app.settings import Settings
from tests.redis_server import free_port


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.upper().startswith("DDPM_"):
            monkeypatch.delenv(name)


def start_lines(*argv: str) -> list[str]:
    """The lines `ddpm-serve`'s settings start-up exits with, for `argv` and the environment."""
    with pytest.raises(SystemExit) as exit_:
        launch.start("ddpm-serve", serve.build_parser().parse_args(list(argv)), serve.FLAGS)
    return str(exit_.value.code).splitlines()


def test_each_invalid_setting_is_one_line_naming_its_variable_and_value(monkeypatch):
    monkeypatch.setenv("DDPM_PORT", "abc")
    monkeypatch.setenv("DDPM_MAX_BATCH", "0")
    monkeypatch.setenv("DDPM_LOG_LEVEL", "")
    assert start_lines() == [
        "ddpm-serve: DDPM_PORT=abc: Input should be a valid integer, unable to parse string as an integer",
        "ddpm-serve: DDPM_MAX_BATCH=0: Input should be greater than or equal to 1",
        "ddpm-serve: DDPM_LOG_LEVEL='': log_level must be one of critical, error, warning, info, debug, "
        "trace, got ''",
    ]


def test_a_flag_given_value_is_named_by_its_flag(monkeypatch):
    monkeypatch.setenv("DDPM_PORT", "abc")  # the flag's value is the one used, and the one named
    assert start_lines("--port", "70000") == [
        "ddpm-serve: --port 70000: Input should be less than or equal to 65535"
    ]
    assert start_lines("--model", "a", "--model", " ") == [
        "ddpm-serve: --model a --model ' ': model references must not be blank",
        "ddpm-serve: DDPM_PORT=abc: Input should be a valid integer, unable to parse string as an integer",
    ]


def test_an_item_of_a_list_is_named_with_its_position(monkeypatch):
    monkeypatch.setenv("DDPM_MODELS", '["a", 2]')
    assert start_lines() == ["ddpm-serve: DDPM_MODELS[1]=2: Input should be a valid string"]


def test_a_secret_s_value_is_not_shown(monkeypatch):
    monkeypatch.setenv("DDPM_API_KEYS", "tooshort-secret")
    assert start_lines() == [
        "ddpm-serve: DDPM_API_KEYS: API keys must be at least 16 characters; key(s) at position 0 are shorter"
    ]


def test_a_long_value_is_cut(monkeypatch):
    monkeypatch.setenv("DDPM_MAX_IMAGES", "9" * 500)
    (line,) = start_lines()
    assert line.startswith("ddpm-serve: DDPM_MAX_IMAGES=999") and len(line) < 200, line
    assert "…: " in line


def test_a_rule_across_settings_names_the_variables_and_flags_it_mentions(monkeypatch):
    monkeypatch.setenv("DDPM_RECLAIM_IDLE_SECONDS", "10")  # fewer than 3 heartbeats of 5 s
    assert start_lines() == [
        "ddpm-serve: reclaim_idle_seconds (10.0) must be at least 3 × worker_heartbeat_seconds (5.0) "
        "(DDPM_RECLAIM_IDLE_SECONDS, DDPM_WORKER_HEARTBEAT_SECONDS)"
    ]
    monkeypatch.delenv("DDPM_RECLAIM_IDLE_SECONDS")
    monkeypatch.setenv("DDPM_CUDA_GRAPHS", "true")
    assert start_lines("--device", "cpu") == [
        "ddpm-serve: cuda_graphs and dtype float16 need a CUDA device, and device is cpu "
        "(DDPM_CUDA_GRAPHS, DDPM_DTYPE, --device)"
    ]


def test_unknown_ddpm_variables_are_warned_about_with_the_closest_setting():
    environ = {
        "DDPM_MAX_BACH": "8",  # a typo
        "DDPM_WHATEVER": "1",  # nothing close
        "DDPM_WORKER_GRACE": "30",  # cut short: closer by letters to DDPM_WORKER_NAME, but it begins one
        "ddpm_port": "9000",  # Settings reads variables without regard to case: known
        "DDPM_HOST": "0.0.0.0",
        "DDPM_URL": "http://api:8000",  # the client's (ddpm remote): no setting, but no typo
        "PATH": "/bin",
    }
    assert launch.unknown_variables(environ, Settings()) == [
        "ignoring unknown environment variable DDPM_MAX_BACH (did you mean DDPM_MAX_BATCH?)",
        "ignoring unknown environment variable DDPM_WHATEVER",
        "ignoring unknown environment variable DDPM_WORKER_GRACE (did you mean DDPM_WORKER_GRACE_SECONDS?)",
    ]


def test_the_client_s_api_key_is_warned_about_only_where_the_server_has_no_keys():
    """DDPM_API_KEY is the client's key; set where DDPM_API_KEYS is not, it may be a typo of it that
    leaves the API without authentication."""
    environ = {"DDPM_API_KEY": "k" * 16}
    assert launch.unknown_variables(environ, Settings()) == [
        "ignoring unknown environment variable DDPM_API_KEY (did you mean DDPM_API_KEYS?)"
    ]
    assert launch.unknown_variables(environ, Settings(api_keys=["k" * 16])) == []


def test_start_logs_the_warnings_once_logging_is_set_up(monkeypatch, caplog):
    monkeypatch.setenv("DDPM_MAX_BACH", "8")
    with caplog.at_level(logging.WARNING, logger="app.launch"):
        settings = launch.start("ddpm-serve", serve.build_parser().parse_args([]), serve.FLAGS)
    assert settings.max_batch == 64
    assert [r.getMessage() for r in caplog.records if r.name == "app.launch"] == [
        "ignoring unknown environment variable DDPM_MAX_BACH (did you mean DDPM_MAX_BATCH?)"
    ]


def test_listen_holds_the_port_and_a_taken_port_is_one_line(capsys):
    port = free_port()
    sockets = launch.listen("ddpm-serve", "127.0.0.1", port)
    try:
        assert [s.getsockname() for s in sockets] == [("127.0.0.1", port)]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # listening: a connection waits in the backlog until the server runs
        with pytest.raises(SystemExit) as exit_:
            launch.listen("ddpm-serve", "127.0.0.1", port)
    finally:
        for sock in sockets:
            sock.close()
    assert exit_.value.code == launch.STARTUP_FAILURE == 3
    err = capsys.readouterr().err
    assert err == f"ddpm-serve: cannot listen on 127.0.0.1:{port}: address already in use\n"


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("203.0.113.7", "cannot assign requested address"),  # TEST-NET-3: no machine's own address
        ("nosuch.invalid", ""),  # cannot be resolved (the resolver's words vary)
    ],
)
def test_a_host_that_cannot_be_listened_on_is_one_line(host, reason, capsys):
    with pytest.raises(SystemExit) as exit_:
        launch.listen("ddpm-serve", host, 8000)
    assert exit_.value.code == 3
    err = capsys.readouterr().err
    assert err.startswith(f"ddpm-serve: cannot listen on {host}:8000: {reason}") and err.count("\n") == 1, err


def test_an_address_without_any_socket_address_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [])
    with pytest.raises(SystemExit) as exit_:
        launch.listen("ddpm-worker", "somewhere", 8000)
    assert exit_.value.code == 3
    assert capsys.readouterr().err == (
        "ddpm-worker: cannot listen on somewhere:8000: getaddrinfo('somewhere') returned no address\n"
    )


def test_ipv6_addresses_are_written_in_brackets():
    assert launch.address("::1", 8000) == "[::1]:8000"
    assert launch.address("0.0.0.0", 8000) == "0.0.0.0:8000"
