"""models/mnist/gpu.sh, the script that trains the bundled model on a GPU and measures its table:
valid bash, and its CPU dry run trains, evaluates every row and packs the results."""

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from app.training.data import SHARED_MNIST

SCRIPT = Path(__file__).resolve().parents[2] / "models" / "mnist" / "gpu.sh"
ROWS = ("real", "ancestral-beta", "ancestral-posterior", "ddim-100", "ddim-50", "ddim-20")


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_dry_run_on_the_cpu_trains_and_measures_every_row():
    """About two minutes on two busy cores: a few training steps, every row at n = 8."""
    with tempfile.TemporaryDirectory(prefix="mnist-gpu-dry-") as folder:
        out = Path(folder)
        env = {
            **os.environ,
            "DEVICE": "cpu",
            "PYTHON": sys.executable,
            "OUT": str(out),
            "DATA": str(SHARED_MNIST),
        }
        env |= {"TRAIN_MINUTES": "0.01", "N": "8", "ANCESTRAL_STEPS": "4", "TMPDIR": folder}
        run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert "trained and measured" in run.stdout
        with tarfile.open(out / "mnist-gpu.tar.gz") as tar:
            tar.extractall(out / "x", filter="data")
        record = json.loads((out / "x" / "model" / "training.json").read_text())
        bundled = json.loads((SCRIPT.parent / "training.json").read_text())
        assert record["step"] >= 1
        assert record["total_step"] == record["step"] + bundled.get("total_step", bundled["step"])
        assert record["config"]["init_from"] == "models/mnist"
        for name in ROWS:
            report = json.loads((out / "x" / f"eval-{name}.json").read_text())
            assert report["n"] == (10_000 if name == "real" else 8) and len(report["class_counts"]) == 10, (
                name
            )
            assert ("--real" in report["command"]) == (name == "real")
        assert (
            "--variance posterior"
            in json.loads((out / "x" / "eval-ancestral-posterior.json").read_text())["command"]
        )
        assert (out / "gpu.log").read_text().count("=== eval") == len(ROWS)
        assert list(out.glob("mnist-gpu-*")) == []  # the work folder is removed
