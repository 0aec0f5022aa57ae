"""Benchmark 5: one training step (Algorithm 1, Adam, clipping, EMA) in float32 and under bf16 autocast.

    .venv/bin/python -m bench.training [--batch 64] [--repeat 5] [--threads N] [--device cpu|cuda]
        [--name training]

Two `Trainer`s with the bundled model's training configuration (its `training.json`) and the same initial
weights, one with `--dtype float32`, one with `--dtype bfloat16`, step on the same batch of random
28×28 images in interleaved rounds. Prints ms per step and images/s of each, and the ratio
float32 / bfloat16 (above 1: bf16 is faster). Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from app.cli import BUNDLED_MODEL
from app.training.train import TrainConfig, Trainer
from bench.common import interleaved, save, set_threads, table

# what run-specific fields the bench sets itself; the rest comes from the shipped model's training.json
RUN_FIELDS = {"data", "out", "batch_size", "dtype", "device", "preview_every", "init_from", "holdout"}


def bundled_flags() -> dict:
    """The bundled model's training configuration, as recorded in models/mnist/training.json."""
    config = json.loads((BUNDLED_MODEL / "training.json").read_text())["config"]
    return {k: v for k, v in config.items() if k in TrainConfig.__dataclass_fields__ and k not in RUN_FIELDS}


def trainer(data: Path, out: Path, *, batch: int, dtype: str, device: str) -> Trainer:
    cfg = TrainConfig(data=str(data), out=str(out), batch_size=batch, dtype=dtype, device=device,
                      preview_every=0, **bundled_flags())  # fmt: skip
    t = Trainer(cfg)
    t.model.train()
    return t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--name", default="training", help="results file name")
    args = parser.parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits.npz"
        images = np.random.default_rng(0).integers(0, 256, (args.batch, 28, 28), dtype=np.uint8)
        np.savez(data, images=images)
        runs = {d: trainer(data, Path(tmp) / d, batch=args.batch, dtype=d, device=args.device)
                for d in ("float32", "bfloat16")}  # fmt: skip
        x0 = runs["float32"].data[: args.batch].to(device)
        seconds = interleaved(
            {d: lambda r=r: r.train_step(x0) for d, r in runs.items()}, device=device, repeat=args.repeat
        )
    rows = [
        {"dtype": d, "batch": args.batch, "ms_per_step": round(s * 1e3, 1),
         "images_s": round(args.batch / s, 1), "ratio": round(seconds["float32"] / s, 3)}
        for d, s in seconds.items()
    ]  # fmt: skip
    print(table(rows, list(rows[0])))
    print(f"wrote {save(args.name, rows, device=str(device), threads=torch.get_num_threads())}")


if __name__ == "__main__":
    main()
