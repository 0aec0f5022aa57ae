"""bench/gpu.sh, the GPU session's prepared script: valid bash, and its CPU dry run passes end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu.sh"
RESULTS = ("gpu_check", "unet_forward", "sampling", "sampling-1000-graphs", "sampling-1000-compile")


def test_gpu_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_dry_run_on_the_cpu_runs_every_step(tmp_path):
    """DEVICE=cpu: tiny sizes, CPU against CPU; about 1.5 minutes on two busy cores (one compile)."""
    env = {**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, "OUT": str(tmp_path)}
    env.pop("BENCH_RESULTS", None)
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "every step passed" in run.stdout
    for name in RESULTS:
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        assert payload["rows"], name
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert len(checks) >= 8 and all(row["ok"] for row in checks)
    assert (tmp_path / "gpu.log").read_text().count("=== ") >= 12  # six steps, begun and ended
