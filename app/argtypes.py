"""argparse types and checks shared by the `ddpm` subcommands: a bad value is a usage error (exit 2)
naming the option, and an output path that cannot be written is refused before any work is done."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def eta(text: str) -> float:
    """DDIM η, in [0, 1] as the service takes it (0 deterministic, 1 the DDPM posterior's variance)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def decay(text: str) -> float:
    """An EMA decay: in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def device(text: str) -> str:
    """A torch device this machine has: "cpu", "cuda", "cuda:1", …"""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s)")
    elif parsed.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda devices are supported")
    return text


def check_output_file(path: str | None, option: str) -> None:
    """ValueError unless `path` can be written as a file: its folder exists and is writable, and it is
    not itself a folder. Checked before the work, so a long run is not lost to a typo."""
    if path is None:
        return
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name")
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{option} {path}: folder {folder} is not writable")


def check_output_folder(path: str, option: str) -> None:
    """ValueError unless `path` is a writable folder or can be made one."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{option} {path} is a file; give a folder")
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise ValueError(f"{option} {path}: {existing} is not writable")
