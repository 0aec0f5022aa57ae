"""Model references, as a user writes them in settings or on the command line, resolved to a Checkpoint."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from app.nets.checkpoint import (
    CONFIG,
    SCHEDULER_CONFIG,
    SHARD_INDEXES,
    WEIGHT_FILES,
    Checkpoint,
    load_checkpoint,
    read_state_dict,
    unet_from_state_dict,
)
from app.nets.convert import convert_original_state_dict, is_original_format
from app.nets.errors import CheckpointError
from app.nets.presets import PRESETS

_PRESET_REF = re.compile(r"(?P<preset>[A-Za-z][\w.-]*):(?P<weights>.+)")
_HUB_REF = re.compile(r"hf:(?P<repo>[^@\s]+)(?:@(?P<revision>[^@\s]+))?")
# NAME=REF: a name of the user's choosing for the model REF loads (two weights files of one preset, one
# hub repository at two revisions); the name as the API shows it: letters, digits, . _ - (no path, no :).
_NAMED_REF = re.compile(r"(?P<name>[A-Za-z0-9][\w.-]{0,63})=(?P<ref>.+)")


def _forms() -> str:
    return (
        "accepted: a checkpoint folder; PRESET:WEIGHTS_FILE with PRESET one of "
        f"{', '.join(PRESETS)} (weights in diffusers or original key names); hf:ORG/NAME[@REVISION]; "
        "any of them as NAME=REF to name the model"
    )


def named_reference(ref: str) -> tuple[str | None, str]:
    """(NAME, REF) of a `NAME=REF` reference, (None, ref) for the others (an existing path with a "=" in
    its name is a path)."""
    if Path(ref).exists() or not (match := _NAMED_REF.fullmatch(ref)):
        return None, ref
    return match["name"], match["ref"]


def preset_reference(ref: str) -> tuple[str, str] | None:
    """(PRESET, WEIGHTS) of a `PRESET:WEIGHTS` reference (the preset not checked), None for other forms."""
    if ref.startswith("hf:") or not (match := _PRESET_REF.fullmatch(ref)):
        return None
    return match["preset"], match["weights"]


def resolve_model(ref: str, *, device: str | torch.device = "cpu") -> Checkpoint:
    """The checkpoint `ref` names: a local folder (diffusers layout), `PRESET:WEIGHTS_PATH` (a preset's
    architecture and scheduler with a weights file, e.g. `cifar10:/ckpt/model-790000.ckpt`), or
    `hf:org/name[@revision]` (downloaded into, or read offline from, the Hugging Face cache); any of them
    as `NAME=REF`, the model then named NAME (else after its folder, preset or repository)."""
    name, ref = named_reference(ref)
    if name is not None:
        return replace(resolve_model(ref, device=device), name=name)
    if Path(ref).is_dir():
        return load_checkpoint(ref, device=device)
    if hub := _HUB_REF.fullmatch(ref):
        folder = _download(hub["repo"], hub["revision"])
        checkpoint = load_checkpoint(folder, device=device)
        return replace(checkpoint, name=hub["repo"].rsplit("/", 1)[-1], source=ref)
    if preset_ref := preset_reference(ref):
        name, weights = preset_ref
        if name not in PRESETS:
            raise CheckpointError(f"{ref}: unknown preset {name!r}; {_forms()}")
        preset = PRESETS[name]
        state = read_state_dict(weights)
        if is_original_format(state):
            try:
                state = convert_original_state_dict(state, preset.unet)
            except CheckpointError as e:
                raise CheckpointError(f"{weights}: {e}") from None
        unet = unet_from_state_dict(preset.unet, state, source=weights, device=device)
        return Checkpoint(unet=unet, scheduler=preset.scheduler, name=name, source=ref)
    raise CheckpointError(f"{ref}: not a checkpoint folder nor a model reference; {_forms()}")


_COMMIT = re.compile(r"[0-9a-f]{40}")


def _download(repo_id: str, revision: str | None) -> Path:
    """The repository's snapshot folder with the config files and one weights file (safetensors when the
    repository has it; the fp16 variant only where the plain files are absent) of one layout, all of one
    commit, fetched by huggingface_hub, which honours HF_HUB_OFFLINE, HF_HOME and HF_HUB_CACHE."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"hf:{repo_id}: the Hugging Face Hub needs huggingface_hub: .venv/bin/pip install -e '.[hub]'"
        ) from None

    def fetch(patterns: list[str], at: str | None) -> Path:
        try:
            return Path(snapshot_download(repo_id, revision=at, allow_patterns=patterns))
        except (OSError, ValueError) as e:  # the hub's errors: not found, offline and not cached, bad id
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            ref = f"hf:{repo_id}" + (f"@{revision}" if revision else "")
            raise CheckpointError(f"{ref}: cannot fetch from the Hugging Face Hub: {reason}") from None

    # The configs first: they tell which layout the weights have (google/ddpm-* hold both).
    folder = fetch([CONFIG, SCHEDULER_CONFIG, f"unet/{CONFIG}", f"scheduler/{SCHEDULER_CONFIG}"], revision)
    # The snapshot folder is named by the commit `revision` resolved to: the weights come from that commit
    # too, even if the branch moves in between (and the hub is not asked to resolve the branch again).
    commit = folder.name if _COMMIT.fullmatch(folder.name) else revision
    prefix = "" if (folder / CONFIG).is_file() else "unet/"
    return _fetch_weights(lambda patterns: fetch(patterns, commit), prefix)


def _fetch_weights(fetch: Callable[[list[str]], Path], prefix: str) -> Path:
    """The snapshot folder once `fetch(allow_patterns)` has brought the first of WEIGHT_FILES (under
    `prefix`) the repository has; if it has none, its weights index files too (small), for the error."""
    for name in WEIGHT_FILES:
        folder = fetch([prefix + name])
        if (folder / prefix / name).is_file():
            return folder
    return fetch([prefix + pattern for pattern in SHARD_INDEXES])
