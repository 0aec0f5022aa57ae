"""`ddpm train` stopped by a signal, in a real process: Ctrl-C (SIGINT) saves and exits 130 with one line
saying where it stopped and how to go on; SIGTERM saves and exits 0; the same command resumes. A second
Ctrl-C stops at once without saving (in-process, with the signals sent from inside a step)."""

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
import pytest

from app.cli import main
from app.training.train import StopNow, TrainConfig, Trainer

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


def _tiny_run(tmp_path: Path, **kw) -> TrainConfig:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=(rng.uniform(0, 1, (16, 8, 8)) > 0.5).astype(np.uint8) * 255)
    base = dict(data=str(tmp_path / "d.npz"), out=str(tmp_path / "run"), ch=32, ch_mult=(1, 2))
    base.update(num_res_blocks=1, attn_resolutions=(4,), num_timesteps=50, batch_size=4, steps=1000)
    return TrainConfig(**{**base, "checkpoint_every": 2, "preview_every": 0, **kw})


def _ctrl_c_twice_in_step(monkeypatch, at_step: int) -> None:
    """Trainer.train_step, but with two SIGINTs sent to this process as step `at_step` + 1 begins."""
    step = Trainer.train_step

    def interrupted(self, x0):
        if self.step == at_step:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, x0)

    monkeypatch.setattr(Trainer, "train_step", interrupted)


def test_a_second_ctrl_c_stops_at_once_and_saves_nothing_more(tmp_path, monkeypatch):
    trainer = Trainer(_tiny_run(tmp_path))
    _ctrl_c_twice_in_step(monkeypatch, at_step=3)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(StopNow):
        trainer.run()
    assert trainer.step == 3 and trainer.saved_step == 2  # step 4 never ended; the step-2 checkpoint stays
    assert _saved_step(tmp_path / "run") == 2 and Trainer(_tiny_run(tmp_path)).step == 2
    assert signal.getsignal(signal.SIGINT) is handler  # run() put the handlers back


def test_a_second_ctrl_c_while_a_checkpoint_is_written_stops_once_it_is(tmp_path, monkeypatch, caplog):
    trainer = Trainer(_tiny_run(tmp_path, preview_every=2, preview_steps=2))
    save, previews = Trainer._save, []

    def ctrl_c_again(self):  # the second SIGINT lands while the write is under way
        if self.stopped_by is not None:
            os.kill(os.getpid(), signal.SIGINT)
        save(self)

    monkeypatch.setattr(Trainer, "_save", ctrl_c_again)
    monkeypatch.setattr(Trainer, "preview", lambda self: previews.append(self.step))
    step = Trainer.train_step

    def ctrl_c(self, x0):
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, x0)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c)
    with pytest.raises(StopNow):
        trainer.run()
    # Step 4 ended and its checkpoint was written in full; its preview (every 2 steps) was not drawn.
    assert trainer.step == trainer.saved_step == 4 and previews == [2]
    assert _saved_step(tmp_path / "run") == 4 and Trainer(_tiny_run(tmp_path)).step == 4
    assert "Ctrl-C again: stopping as soon as the checkpoint being written is" in caplog.text


def test_a_ctrl_c_after_a_sigterm_is_the_first_ctrl_c(tmp_path, monkeypatch, caplog):
    trainer = Trainer(_tiny_run(tmp_path))
    step = Trainer.train_step

    def stopped(self, x0):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, x0)

    monkeypatch.setattr(Trainer, "train_step", stopped)
    trainer.run()  # the step ends and is saved, as for either signal alone
    assert trainer.stopped_by == signal.SIGTERM and trainer.step == trainer.saved_step == 3
    assert "signal 2: already stopping at the end of this step" in caplog.text


@pytest.mark.parametrize("at_step", [3, 0])
def test_ddpm_train_says_what_a_second_ctrl_c_left(tmp_path, monkeypatch, capsys, at_step):
    config = _tiny_run(tmp_path)
    words = ["train", "--data", config.data, "--out", config.out, "--ch", "32", "--ch-mult", "1,2"]
    words += ["--num-res-blocks", "1", "--attn-resolutions", "4", "--batch-size", "4", "--steps", "1000"]
    words += ["--checkpoint-every", "2", "--preview-every", "0", "--device", "cpu"]
    _ctrl_c_twice_in_step(monkeypatch, at_step=at_step)
    with pytest.raises(SystemExit) as e:
        main(words)
    assert e.value.code == 130
    said = capsys.readouterr().err.strip().splitlines()[-1]
    if at_step:
        assert said == (
            f"ddpm train: interrupted again: stopped at once at step 3, unsaved; {config.out} holds step 2; "
            f"the same command resumes: {shlex.join(['ddpm', *words])}"
        )
    else:
        assert said == "ddpm train: interrupted again: stopped at once at step 0, nothing saved"
        assert not (Path(config.out) / "state.pt").exists()
