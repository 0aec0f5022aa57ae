"""`ddpm train` stopped by a signal, in a real process: Ctrl-C (SIGINT) saves and exits 130 with one line
saying where it stopped and how to go on; SIGTERM saves and exits 0; the same command resumes."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def _saved_step(run: Path) -> int | None:
    """The step of the run's last save, from model/training.json (None before the first, or mid-write)."""
    try:
        found = re.search(r'"step": (\d+),', (run / "model" / "training.json").read_text())
    except OSError:
        return None
    return int(found[1]) if found else None


def _wait_for(condition, process: subprocess.Popen, log: Path, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"ended before {what}: {log.read_text()}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s: {log.read_text()}"
        time.sleep(0.05)


def _start(words: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as err:  # a file, not a pipe: the progress bar would fill a pipe no one reads
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", *words],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=REPO,
            env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal starts it
        )


def test_ctrl_c_saves_exits_130_and_the_same_command_resumes(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=(rng.uniform(0, 1, (16, 8, 8)) > 0.5).astype(np.uint8) * 255)
    run = tmp_path / "run"
    words = ["train", "--data", str(tmp_path / "d.npz"), "--out", str(run), "--ch", "32"]
    words += ["--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-resolutions", "4", "--steps", "100000"]
    words += ["--batch-size", "4", "--checkpoint-every", "1", "--preview-every", "0", "--device", "cpu"]

    log = tmp_path / "first.log"
    process = _start(words, log)
    _wait_for(lambda: _saved_step(run) is not None, process, log, "first checkpoint")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130, log.read_text()
    err = log.read_text()
    assert "Traceback" not in err and process.stdout.read() == b""  # no "EMA weights: …" as when done
    said = r"ddpm train: interrupted at step (\d+) of 100000, saved in (.+); the same command resumes: (.+)"
    line = re.search(said, err)
    assert line, err
    step = int(line[1])
    assert step >= 1 and line[2] == str(run) and line[3] == shlex.join(["ddpm", *words])
    assert (run / "state.pt").is_file() and _saved_step(run) == step

    # The same command goes on from that step; SIGTERM (how a scheduler or `kill` stops it) is a clean stop.
    log = tmp_path / "again.log"
    process = _start(words, log)
    _wait_for(lambda: (_saved_step(run) or 0) > step, process, log, "a step past the first run's")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log.read_text()
    err = log.read_text()
    assert f"resumed {run} at step {step}" in err and "interrupted" not in err and "Traceback" not in err
    assert process.stdout.read().decode().startswith(f"EMA weights: {run / 'model'}")
