"""argparse types and checks shared by the `ddpm` subcommands: a bad value is a usage error (exit 2)
naming the option (an output file named for another format than it is written in, too), an output path
that cannot be written is refused before any work is done, and so is an input path of the wrong kind
(a folder for a file, a file for a folder, missing, unreadable), in one line naming the option."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from app.settings import unavailable


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


def positive_float(text: str) -> float:
    """A finite value above 0 (a learning rate, a gradient-norm bound: 0 or less would stop or reverse
    training without a word)."""
    value = float(text)
    if not 0.0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
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
    if problem := unavailable(text):
        raise argparse.ArgumentTypeError(problem)
    return text


def output_file(suffix: str, written_as: str, *, ignore_case: bool = True) -> Callable[[str], str]:
    """An argparse type for a file written in one format: its name must end in `suffix`, so that
    `--out grid.jpg` is a usage error before any work rather than a PNG under another format's name.
    `written_as` says what the file holds. An existing folder passes: check_output_file says it is one."""

    def check(text: str) -> str:
        path = Path(text)
        found = path.suffix.lower() if ignore_case else path.suffix
        if found != suffix and not path.is_dir():
            problem = f"suffix {path.suffix}" if path.suffix else "no suffix"
            raise argparse.ArgumentTypeError(
                f"{text} has {problem}; {written_as}: give a file name ending in {suffix}"
            )
        return text

    check.__name__ = f"{suffix} file"
    return check


# The grids are written losslessly as PNG (API.md's 8-bit mapping), whatever the name says.
png_file = output_file(".png", "the grid is written as a PNG")
# numpy.save appends .npy to any other name (x.NPY -> x.NPY.npy): the suffix must be exactly .npy.
npy_file = output_file(".npy", "the values are written by numpy.save", ignore_case=False)


def check_sampler_options(args: argparse.Namespace) -> None:
    """A sampler's own options only with that sampler: `--eta` is DDIM's, `--variance` (σ² = β or β̃)
    ancestral sampling's; given with the other sampler they would be ignored without a word."""
    if args.sampler != "ddim" and args.eta != 0:
        raise ValueError(f"--eta {args.eta:g} applies to --sampler ddim only")
    if args.sampler == "ddim" and getattr(args, "variance", None) is not None:
        raise ValueError(
            f"--variance {args.variance} applies to --sampler ddpm only (DDIM's noise comes from --eta)"
        )


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


def check_input_file(path: str, option: str, expected: str) -> None:
    """ValueError unless `path` is a readable file; `expected` says what the option takes, e.g.
    "an image file". One line naming the option, for a folder, a missing path or an unreadable file."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option}: {path} is a folder; give {expected}")
    if not target.exists():
        raise ValueError(f"{option}: no such file {path}; give {expected}")
    if not os.access(target, os.R_OK):
        raise ValueError(f"{option}: {path} is not readable")


def check_input_folder(path: str, option: str, expected: str, *, holding: tuple[str, ...] = ()) -> None:
    """ValueError unless `path` is a readable folder with the files `holding`; `expected` says what the
    option takes, e.g. "a classifier folder (config.json and model.safetensors)"."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{option}: {path} is a file; give {expected}")
    if not target.exists():
        raise ValueError(f"{option}: no such folder {path}; give {expected}")
    if not os.access(target, os.R_OK | os.X_OK):
        raise ValueError(f"{option}: {path} is not readable")
    missing = [name for name in holding if not (target / name).is_file()]
    if missing:
        raise ValueError(f"{option}: {path} has no {' and '.join(missing)}; give {expected}")


_CHECKPOINT_FOLDER = "a checkpoint folder (config.json, scheduler_config.json and the weights)"


def check_model_folder(path: str, option: str) -> None:
    """ValueError unless `path` may be a checkpoint folder: a readable folder, and not the run folder of
    `ddpm train`, whose model is in its model/ (the layout is load_checkpoint's to check)."""
    check_input_folder(path, option, _CHECKPOINT_FOLDER)
    _not_a_run_folder(Path(path), option)


def check_model_ref(ref: str, option: str) -> None:
    """ValueError for the path mix-ups of a model reference (a checkpoint folder, PRESET:WEIGHTS_FILE
    or hf:REPO) before anything is loaded: a weights file given without its preset, a PRESET:WEIGHTS
    whose weights are a folder, the run folder of `ddpm train` given for its model/. Anything else is
    left to resolve_model, which names the accepted forms."""
    from app.nets import PRESETS
    from app.nets.resolve import named_reference, preset_reference

    _, ref = named_reference(ref)
    path = Path(ref)
    if path.is_dir():
        _not_a_run_folder(path, option)
        return
    if path.is_file():
        raise ValueError(
            f"{option}: {ref} is a file; give {_CHECKPOINT_FOLDER}, or PRESET:{ref} for a weights file "
            f"(PRESET one of {', '.join(PRESETS)})"
        )
    preset, weights = preset_reference(ref) or ("", "")
    if preset in PRESETS and Path(weights).is_dir():
        raise ValueError(
            f"{option}: {weights} is a folder; {preset}:WEIGHTS takes a weights file (.safetensors, .ckpt, "
            ".pt, .pth or .bin), and a checkpoint folder is given on its own"
        )


def _not_a_run_folder(path: Path, option: str) -> None:
    """A `ddpm train --out` folder holds state.pt and, in model/, the checkpoint to use."""
    model = path / "model"
    layout = (path / "config.json").exists() or (path / "unet").exists()
    if not layout and (model / "config.json").exists():
        raise ValueError(f"{option}: {path} is a training run folder; its model is {model}")
