"""bench/gpu.sh, the GPU session's prepared script: valid bash, and its CPU dry run passes end to end."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu.sh"
RESULTS = ("gpu_check", "unet_forward", "sampling", "sampling-1000-graphs", "sampling-1000-compile")


def test_gpu_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.fixture
def out():
    # Not tmp_path: pytest runs elsewhere on a shared machine rotate numbered temp folders away.
    with tempfile.TemporaryDirectory(prefix="gpu-sh-dry-") as folder:
        yield Path(folder)


@pytest.mark.slow
def test_dry_run_on_the_cpu_runs_every_step(out):
    """DEVICE=cpu: tiny sizes, CPU against CPU; about 1.5 minutes on two busy cores (one compile)."""
    env = {**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, "OUT": str(out)}
    env.pop("BENCH_RESULTS", None)
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "every step passed" in run.stdout
    for name in RESULTS:
        payload = json.loads((out / f"{name}.json").read_text())
        assert payload["rows"], name
    checks = json.loads((out / "gpu_check.json").read_text())["rows"]
    assert len(checks) >= 8 and all(row["ok"] for row in checks)
    assert (out / "gpu.log").read_text().count("=== ") >= 12  # six steps, begun and ended
