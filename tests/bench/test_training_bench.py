"""bench/training.py runs end to end and writes its table (a small batch; speed is not asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_training_bench_times_float32_and_bfloat16_steps(tmp_path):
    env = {**os.environ, "BENCH_RESULTS": str(tmp_path)}
    cmd = [sys.executable, "-m", "bench.training", "--batch", "4", "--repeat", "1", "--threads", "1"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "training.json").read_text())["rows"]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    assert rows[0]["ratio"] == 1.0 and all(r["ms_per_step"] > 0 and r["batch"] == 4 for r in rows)
    assert "ms_per_step" in run.stdout
