"""Checkpoints in diffusers' folder layout: reading (top-level or `unet/` + `scheduler/` subfolders,
safetensors or weights-only pickles, legacy attention names) and writing (the top-level layout)."""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from app.nets.config import SchedulerConfig, UNetConfig
from app.nets.errors import CheckpointError
from app.nets.unet import UNet

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "SchedulerConfig",
    "check_state_dict",
    "load_checkpoint",
    "read_state_dict",
    "save_checkpoint",
    "unet_from_state_dict",
]

CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # in order of preference
# diffusers' `variant="fp16"` files, read (as float32) only where the plain ones are absent.
FP16_WEIGHTS = ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
WEIGHT_FILES = WEIGHTS + FP16_WEIGHTS
_LAYOUT = (
    f"{CONFIG}, {SCHEDULER_CONFIG} and {WEIGHTS[0]} (or .bin, or their .fp16 variants), or unet/ and "
    "scheduler/ subfolders"
)
# What else may lie next to a config.json, for the error that finds no weights there.
# diffusers' index files of sharded weights (not read: named in errors).
SHARD_INDEXES = ("*.index.json", "*.index.*.json")
_OTHER_WEIGHTS = ("*.safetensors", "*.bin", "*.ckpt", "*.pt", "*.pth", *SHARD_INDEXES)

# The paper's own release: TensorFlow checkpoints, model.ckpt-790000.{index,meta,data-00000-of-00001}.
_TF_CHECKPOINT = re.compile(r".*\.(index|meta|data-\d+-of-\d+)")
TF_CHECKPOINT_ADVICE = (
    "TensorFlow checkpoints (the paper's original release) must be converted to PyTorch first: the PyTorch "
    "port of the original code, github.com/pesser/pytorch_diffusion, converts them (its scripts/convert.py, "
    "which needs TensorFlow) and offers the converted files (model-790000.ckpt and the like) for download; "
    "load one of those as PRESET:model-790000.ckpt, or convert it with `ddpm convert`. The diffusers "
    "copies of the paper's models are hf:google/ddpm-cifar10-32, -celebahq-256, -church-256, -bedroom-256 "
    "and -cat-256"
)

# diffusers files of 2022 name the attention projections as its old AttentionBlock did.
_LEGACY_ATTENTION = re.compile(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass
class Checkpoint:
    """A loaded model: the ε-network (float32, eval mode) and the forward process it was trained with."""

    unet: UNet
    scheduler: SchedulerConfig
    name: str
    source: str  # a folder path, "hf:org/name[@revision]" or "PRESET:weights"

    def __post_init__(self) -> None:
        config = self.unet.config
        if config.out_channels != config.in_channels:  # a network fine in itself, but not an ε_θ to serve
            raise CheckpointError(
                f"{self.source}: config key 'out_channels' = {config.out_channels!r} is not supported; "
                f"supported: in_channels ({config.in_channels}): the network must predict ε, one value "
                "per input value (a learned-variance head, 2 × in_channels, is not supported)"
            )

    @property
    def num_parameters(self) -> int:
        return self.unet.num_parameters()

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size

    @property
    def channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def _unpickler_reason(message: str) -> str:
    """What torch's weights-only unpickler objected to, without torch's advice to load the file with
    weights_only=False (which would run whatever code the file holds)."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", message, re.DOTALL)
    reason = " ".join((found.group(1) if found else message.splitlines()[0]).split())
    return reason.split(". Please use", 1)[0]


def tensorflow_checkpoint(path: str | os.PathLike[str]) -> Path | None:
    """The TensorFlow checkpoint file `path` is (model.ckpt-N.index, .meta or .data-…-of-…) or names by
    its prefix (model.ckpt-N, with model.ckpt-N.index beside it), None otherwise."""
    path = Path(path)
    if not path.name:  # "." or "/": a folder, never a checkpoint's prefix (and with_name would raise)
        return None
    if _TF_CHECKPOINT.fullmatch(path.name) and path.is_file():
        return path
    index = path.with_name(path.name + ".index")
    return index if not path.exists() and index.is_file() else None


def _tensorflow_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if _TF_CHECKPOINT.fullmatch(p.name) and p.is_file())


def tensorflow_checkpoint_error(path: str | os.PathLike[str]) -> CheckpointError:
    return CheckpointError(f"{path}: a TensorFlow checkpoint, not PyTorch weights. {TF_CHECKPOINT_ADVICE}")


def _without_data_parallel_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state_dict saved from a torch.nn.DataParallel (or DistributedDataParallel) wrapper has every key
    under "module."; the network's own keys are what is left."""
    if state and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return state


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The tensors of a .safetensors file, or of a pickle (.bin/.ckpt/.pt/.pth) read with weights_only=True,
    which runs no code from the file; a "module." prefix on every key (DataParallel's) is removed."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path}: a folder, not a weights file (.safetensors, .ckpt, .pt, .pth or .bin)"
        )
    if tensorflow_checkpoint(path):
        raise tensorflow_checkpoint_error(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            state = load_file(path)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            reason = _unpickler_reason(str(e))
            if not reason.startswith("Unsupported global"):  # not a pickle of tensors at all (an HTML page)
                raise CheckpointError(
                    f"{path}: not a readable PyTorch weights file (corrupt, truncated, or another kind of "
                    f"file: {reason})"
                ) from None
            raise CheckpointError(
                f"{path}: refused: this pickle needs arbitrary code to load, and only plain tensors are read "
                f"({reason})"
            ) from None
        except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError) as e:
            # KeyError, IndexError, ValueError: the unpickler's, on a file that is no pickle (a text file)
            raise CheckpointError(
                f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {e})"
            ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: expected a state_dict (a dict of tensors), got a {type(state).__name__}"
        )
    for key, value in state.items():
        if not isinstance(value, Tensor):
            kind = type(value).__name__
            raise CheckpointError(
                f"{path}: expected a state_dict (a dict of tensors), but {key!r} holds a {kind}"
            )
    return _without_data_parallel_prefix(state)


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def check_state_dict(expected: Mapping[str, torch.Size], found: Mapping[str, Tensor], *, what: str) -> None:
    """Raise one CheckpointError naming (a few of) the missing, unexpected and misshapen tensors."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    misshapen = [
        f"{k} expected {tuple(expected[k])} found {tuple(found[k].shape)}"
        for k in sorted(expected.keys() & found.keys())
        if expected[k] != found[k].shape
    ]
    problems = [
        f"{len(missing)} missing keys: {_few(missing)}" if missing else "",
        f"{len(unexpected)} unexpected keys: {_few(unexpected)}" if unexpected else "",
        f"{len(misshapen)} wrong shapes: {_few(misshapen)}" if misshapen else "",
    ]
    if any(problems):
        raise CheckpointError(f"the {what} do not match the config ({'; '.join(p for p in problems if p)})")


def unet_from_state_dict(
    config: UNetConfig, state: Mapping[str, Tensor], *, source: str, device: str | torch.device = "cpu"
) -> UNet:
    """A UNet of `config` in float32 and eval mode on `device`, holding copies of exactly the tensors of
    `state` (diffusers names; legacy attention names accepted). A missing, unexpected or misshapen tensor
    raises CheckpointError naming `source`."""
    renamed = {}
    for key, value in state.items():
        legacy = _LEGACY_ATTENTION.fullmatch(key)
        renamed[f"{legacy[1]}{_LEGACY_NAMES[legacy[2]]}.{legacy[3]}" if legacy else key] = value
    with torch.device("meta"):  # no random initialisation: every parameter is overwritten below
        unet = UNet(config)
    try:
        check_state_dict({k: v.shape for k, v in unet.state_dict().items()}, renamed, what="weights")
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    unet = unet.to_empty(device=device).float()
    unet.load_state_dict(renamed, strict=True)  # copies: the result shares no memory with `state`
    return unet.eval()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open() as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the JSON config ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


def _parse(cls: Any, path: Path) -> Any:
    d = _read_json(path)
    try:
        return cls.from_dict(d)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _find(root: Path, subfolder: str, name: str) -> Path:
    """`name` at the top of `root`, else in its `subfolder`."""
    for candidate in (root / name, root / subfolder / name):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{root}: no {name} (nor {subfolder}/{name}); expected {_LAYOUT}")


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    scheduler: SchedulerConfig | None = None,
) -> Checkpoint:
    """A diffusers UNet2DModel + DDPMScheduler folder: top-level files, or a pipeline's `unet/` and
    `scheduler/` subfolders. `scheduler` replaces a scheduler_config.json, which is otherwise required."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            f"{root}: {'not a folder' if root.exists() else 'no such folder'}; expected {_LAYOUT}"
        )
    try:
        config_path = _find(root, "unet", CONFIG)
    except CheckpointError as e:
        if tf := _tensorflow_files(root):  # the paper's release folder, diffusion_cifar10_model/
            raise CheckpointError(f"{root}: holds {_few(tf)}, no {CONFIG}: {TF_CHECKPOINT_ADVICE}") from e
        raise
    config = _parse(UNetConfig, config_path)
    if scheduler is None:
        scheduler = _parse(SchedulerConfig, _find(root, "scheduler", SCHEDULER_CONFIG))
    weights = weights_file(config_path.parent)
    unet = unet_from_state_dict(config, read_state_dict(weights), source=str(weights), device=device)
    return Checkpoint(unet=unet, scheduler=scheduler, name=root.resolve().name, source=str(root))


def weights_file(folder: Path) -> Path:
    """The weights file of the folder holding a config.json: the first of WEIGHT_FILES there (the .fp16
    variants only where the plain files are absent); else a CheckpointError naming what the folder holds."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted({p.name for pattern in _OTHER_WEIGHTS for p in folder.glob(pattern) if p.is_file()})
    tf = _tensorflow_files(folder)
    message = f"{folder}: no {', '.join(WEIGHT_FILES[:-1])} or {WEIGHT_FILES[-1]} next to {CONFIG}"
    shards = [name for name in found if ".index." in name]
    if tf:
        message += f"; found {_few(tf)}: {TF_CHECKPOINT_ADVICE}"
    elif shards:
        message += (
            f"; found {_few(shards)}: sharded weights, which this service does not read; save the model "
            "unsharded (diffusers: save_pretrained with a max_shard_size above its size)"
        )
    elif found:
        message += f"; found {_few(found)}"
    raise CheckpointError(message)


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(path: str | os.PathLike[str], unet: UNet, scheduler: SchedulerConfig) -> Path:
    """Write config.json, scheduler_config.json and diffusion_pytorch_model.safetensors into the folder `path`
    (created if needed), which diffusers' `UNet2DModel.from_pretrained` and `DDPMScheduler.from_pretrained`
    load. Each file is replaced atomically, so a reader never sees half a file."""
    if not isinstance(unet, UNet):
        raise TypeError(f"save_checkpoint needs the UNet itself, not a {type(unet).__name__} wrapping it")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    _write_atomically(folder / WEIGHTS[0], lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    for name, config in ((CONFIG, unet.config.to_dict()), (SCHEDULER_CONFIG, scheduler.to_dict())):
        _write_atomically(
            folder / name, lambda p, c=config: p.write_text(json.dumps(c, indent=2, sort_keys=True))
        )
    return folder
