"""bench/precision.py compares two sample sets drawn with the same seeds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from app.training.data import SHARED_MNIST, load_images

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path, a, b):
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    env = {**os.environ, "BENCH_RESULTS": str(tmp_path)}
    cmd = [sys.executable, "-m", "bench.precision", str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_precision_bench_measures_pixels_labels_and_scores(tmp_path):
    a = load_images(str(SHARED_MNIST))[:200].numpy().astype(np.float32)
    b = a.copy()
    b[:20] = -a[:20]  # 20 images inverted: their labels change; the other 180 are equal
    run = _run(tmp_path, a, b)
    assert run.returncode == 0, run.stderr
    row = json.loads((tmp_path / "precision.json").read_text())["rows"][0]
    assert row["n"] == 200 and row["images_over_0.1"] == 20 and row["max_abs_diff"] == 2.0
    assert 0.85 <= row["label_agreement"] < 1.0
    assert row["is_a"] > row["is_b"] and row["confidence_a"] > 0.95


def test_precision_bench_refuses_sets_of_other_shapes(tmp_path):
    run = _run(tmp_path, np.zeros((4, 1, 28, 28), np.float32), np.zeros((5, 1, 28, 28), np.float32))
    assert run.returncode != 0 and "not the same seeds" in run.stderr
