"""Intra-op threads (app.engine.threads): in a confined process only the engine threads compute in parallel.

Each check runs in a fresh interpreter with OMP_NUM_THREADS=2: confinement must come before any torch
work, and libgomp keeps a thread's team for the life of the process's thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from app.engine import threads
from tests.engine.conftest import sample_work

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading
    from concurrent.futures import ThreadPoolExecutor
    import torch
    from app.engine import threads
    from app.engine.engine import Engine
    from tests.engine.conftest import Recorder, sample_work
    from tests.tiny import tiny_checkpoint

    def tasks():  # the process's OS threads, libgomp's workers among them
        return len(os.listdir("/proc/self/task"))

    def big_op():  # far above torch's grain size: computed in parallel where the thread may
        torch.randn(4_000_000).mul_(2)

    confine = sys.argv[1] == "confine"
    if confine:
        threads.confine()
    seen = {}
    before = tasks()
    big_op()
    seen["main_new_tasks"] = tasks() - before
    seen["main"] = torch.get_num_threads()

    class Threads(Recorder):
        def on_finished(self, job_id, images, extra):
            seen["engine"] = torch.get_num_threads()  # called in the engine thread
            super().on_finished(job_id, images, extra)

    rec = Threads()
    engine = Engine(tiny_checkpoint(), name="tiny", listener=rec, max_batch=4)
    engine.start()
    engine.submit(sample_work("a", n=4, steps=3))
    assert rec.wait("a")[0] == "finished"

    def other():  # a thread started after the engine, like a request handler's
        before = tasks()
        big_op()
        seen["other_new_tasks"] = tasks() - before
        seen["other"] = torch.get_num_threads()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()

    images, kernels = torch.randn(8, 64, 64, 64), torch.randn(64, 64, 3, 3)

    def conv_first():  # oneDNN skips torch's per-thread set-up: a bare thread takes libgomp's default
        before = tasks()
        torch.nn.functional.conv2d(images, kernels)
        return tasks() - before, torch.get_num_threads()

    with ThreadPoolExecutor(1, initializer=threads.follow) as encoder:  # as the runner's encoders
        seen["encoder_new_tasks"], seen["encoder"] = encoder.submit(conv_first).result()
    with ThreadPoolExecutor(1) as bare:
        seen["bare_conv_new_tasks"] = bare.submit(conv_first).result()[0]
    seen["for_engines"] = threads.for_engines()
    engine.stop(10)
    print(json.dumps(seen))
    """
)


POOL_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, torch
    from app.engine import threads
    from app.engine.pool import EnginePool
    from tests.engine.conftest import Recorder, sample_work
    from tests.tiny import tiny_checkpoint

    threads.confine()
    seen = {}

    class Threads(Recorder):
        def on_finished(self, job_id, images, extra):
            seen[job_id] = torch.get_num_threads()  # in the engine thread of the job's model
            super().on_finished(job_id, images, extra)

    rec = Threads()
    pool = EnginePool({"a": tiny_checkpoint(), "b": tiny_checkpoint(seed=1)}, listener=rec, max_batch=2)
    pool.start()
    for model in ("a", "b"):
        pool.submit(dataclasses.replace(sample_work(model, n=1, steps=2), model=model))
        assert rec.wait(model)[0] == "finished"
    pool.stop(10)
    print(json.dumps(seen))
    """
)


def _run(mode: str, script: str = SCRIPT) -> dict[str, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script, mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch built without OpenMP")
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_confined_process_computes_in_parallel_in_the_engine_thread_only():
    seen = _run("confine")
    assert seen == {
        "main_new_tasks": 0,  # no OpenMP team for the main thread, which loads the models
        "main": 1,
        "engine": 2,  # the engine thread has the process's threads
        "other_new_tasks": 0,  # a later thread computes alone too (torch's count was put back to 1)
        "other": 1,
        "encoder_new_tasks": 0,  # a convolution first, in a thread that called follow()
        "encoder": 1,
        "bare_conv_new_tasks": 1,  # why follow() exists: without it a convolution starts a team
        "for_engines": 2,
    }


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_without_confine_every_thread_has_a_team_as_torch_does_by_default():
    """The case `confine` exists for, and that `take` changes nothing in a process that never confined."""
    seen = _run("plain")
    assert seen["main_new_tasks"] == 1  # libgomp started a worker for the main thread's team
    assert seen["main"] == seen["engine"] == seen["other"] == seen["for_engines"] == 2


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch built without OpenMP")
def test_cpu_engines_of_one_process_share_its_threads():
    """Two teams of two on two cores would throttle each other, even while one model is idle."""
    assert _run("pool", POOL_SCRIPT) == {"a": 1, "b": 1}


def test_an_engine_starts_once(engine_factory):
    engine, _ = engine_factory()
    engine.start()
    with pytest.raises(RuntimeError, match="started already"):
        engine.start()


def test_confine_before_serving_loads_models(monkeypatch):
    """Both entry points that run engines confine torch before loading (the first torch work)."""
    from app import loading, serve
    from app.nets import CheckpointError
    from app.worker import main as worker_main

    calls = []
    monkeypatch.setattr(threads, "confine", lambda: calls.append("confine") or 2)

    def load_models(settings):
        calls.append("load")
        raise CheckpointError("stop here")

    monkeypatch.setattr(loading, "load_models", load_models)
    monkeypatch.delenv("DDPM_REDIS_URL", raising=False)
    with pytest.raises(SystemExit, match="stop here"):
        serve._serve(serve.settings_from(serve.build_parser().parse_args([])), [])
    monkeypatch.setenv("DDPM_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.delenv("DDPM_WORKER_METRICS_PORT", raising=False)
    with pytest.raises(SystemExit, match="stop here"):
        worker_main.main([])
    assert calls == ["confine", "load", "confine", "load"]


def test_a_failed_warm_up_is_raised_by_start_and_leaves_no_thread(engine_factory, monkeypatch):
    engine, _ = engine_factory()

    def broken(shape):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(engine.forward, "warm_up", broken)
    with pytest.raises(RuntimeError, match="no kernel"):
        engine.start()
    assert not engine.alive


def test_the_engine_warms_up_in_its_own_thread(engine_factory, monkeypatch):
    """Compiled CPU kernels fix their thread count when compiled: the warm-up must run where steps run."""
    engine, rec = engine_factory()
    where = []
    warm_up = engine.forward.warm_up
    monkeypatch.setattr(
        engine.forward,
        "warm_up",
        lambda shape: where.append(threading.current_thread().name) or warm_up(shape),
    )
    engine.start()
    engine.submit(sample_work("a", n=1, steps=2))
    assert rec.wait("a")[0] == "finished"
    assert where == ["engine-tiny"]
