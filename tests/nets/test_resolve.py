"""Model references: folders, PRESET:WEIGHTS (either key naming), hf:org/name from an offline hub cache."""

import fnmatch
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.nets.checkpoint import save_checkpoint
from app.nets.config import SchedulerConfig
from app.nets.convert import to_original_state_dict
from app.nets.errors import CheckpointError
from app.nets.presets import PRESETS, Preset
from app.nets.resolve import resolve_model

SCHEDULER = SchedulerConfig(variance_type="fixed_small")
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def unet(random_unet):
    return random_unet(seed=4)


@pytest.fixture
def tiny_preset(monkeypatch, small_config):
    preset = Preset("tiny", small_config, SCHEDULER, "-", "a small preset for tests")
    monkeypatch.setitem(PRESETS, "tiny", preset)
    return preset


def same_weights(a, b):
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_local_folder(tmp_path, unet):
    save_checkpoint(tmp_path / "mnist", unet, SCHEDULER)
    ckpt = resolve_model(str(tmp_path / "mnist"))
    assert (ckpt.name, ckpt.source, ckpt.scheduler) == ("mnist", str(tmp_path / "mnist"), SCHEDULER)
    assert same_weights(ckpt.unet, unet)


def test_preset_with_original_weights(tmp_path, unet, tiny_preset, small_config):
    torch.save(to_original_state_dict(unet.state_dict(), small_config), tmp_path / "model-790000.ckpt")
    ref = f"tiny:{tmp_path / 'model-790000.ckpt'}"
    ckpt = resolve_model(ref)
    assert (ckpt.name, ckpt.source, ckpt.scheduler) == ("tiny", ref, SCHEDULER)
    assert same_weights(ckpt.unet, unet)


def test_preset_with_diffusers_weights(tmp_path, unet, tiny_preset):
    save_file(unet.state_dict(), tmp_path / "ema.safetensors")
    assert same_weights(resolve_model(f"tiny:{tmp_path / 'ema.safetensors'}").unet, unet)


def test_two_weights_files_of_one_preset_served_side_by_side_under_names_of_their_own(
    tmp_path, random_unet, tiny_preset
):
    """Without names both would be "tiny" (the preset's), and the service refuses two models of one name:
    NAME=REF names each."""
    from app.loading import load_models
    from app.settings import Settings

    ema, raw = random_unet(seed=1), random_unet(seed=2)
    save_file(ema.state_dict(), tmp_path / "ema.safetensors")
    save_file(raw.state_dict(), tmp_path / "raw.safetensors")
    refs = [f"tiny:{tmp_path / 'ema.safetensors'}", f"tiny:{tmp_path / 'raw.safetensors'}"]
    with pytest.raises(ValueError, match=r"two models are named 'tiny' .*; name one of them: NAME=tiny:"):
        load_models(Settings(models=refs, device="cpu"))
    loaded = load_models(Settings(models=[f"tiny-ema={refs[0]}", f"tiny-raw={refs[1]}"], device="cpu"))
    assert list(loaded) == ["tiny-ema", "tiny-raw"]  # the first stays the default
    assert same_weights(loaded["tiny-ema"].unet, ema) and same_weights(loaded["tiny-raw"].unet, raw)
    assert loaded["tiny-raw"].source == refs[1]


def test_a_folder_whose_name_holds_an_equals_sign_is_a_folder(tmp_path, unet):
    save_checkpoint(tmp_path / "lr=2e-4", unet, SCHEDULER)
    assert resolve_model(str(tmp_path / "lr=2e-4")).name == "lr=2e-4"
    named = resolve_model(f"mine={tmp_path / 'lr=2e-4'}")
    assert named.name == "mine" and same_weights(named.unet, unet)


def test_preset_with_weights_of_another_architecture(tmp_path, unet, small_config):
    torch.save(to_original_state_dict(unet.state_dict(), small_config), tmp_path / "m.ckpt")
    with pytest.raises(
        CheckpointError, match=r"m\.ckpt: the original-format weights do not match the config"
    ):
        resolve_model(f"cifar10:{tmp_path / 'm.ckpt'}")


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nope:/ckpt/model.ckpt", "unknown preset 'nope'"),
        ("cifar10:/no/such/model.ckpt", "/no/such/model.ckpt: no such file"),
        ("cifar10:/tmp", "/tmp: a folder, not a weights file (.safetensors, .ckpt"),
        ("./no/such/folder", "not a checkpoint folder nor a model reference"),
        ("hf:", "not a checkpoint folder nor a model reference"),
    ],
)
def test_bad_references(ref, message):
    with pytest.raises(CheckpointError) as e:
        resolve_model(ref)
    assert message in str(e.value)
    if "nor a model reference" in message or "unknown preset" in message:
        assert "PRESET:WEIGHTS_FILE" in str(e.value) and "hf:ORG/NAME[@REVISION]" in str(e.value)


def test_missing_huggingface_hub_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match=r"pip install -e '\.\[hub\]'"):
        resolve_model("hf:google/ddpm-cifar10-32")


def fake_hub_cache(cache: Path, repo: str, files: dict[str, bytes], revision: str = "main") -> str:
    """huggingface_hub's cache layout: models--ORG--NAME/refs/REVISION holds a commit hash, and
    snapshots/HASH/ the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / revision).write_text(commit)
    for name, content in files.items():
        path = root / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return commit


def test_hub_reference_offline_from_the_cache(tmp_path, unet):
    """In a fresh interpreter, as huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when imported."""
    save_checkpoint(tmp_path / "saved", unet, SCHEDULER)
    files = {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    pipeline = {f"unet/{n}": files[n] for n in ("config.json", "diffusion_pytorch_model.safetensors")}
    pipeline["scheduler/scheduler_config.json"] = files["scheduler_config.json"]
    pipeline["model_index.json"] = b'{"_class_name": "DDPMPipeline"}'
    fake_hub_cache(tmp_path / "hub", "org/name", files)
    fake_hub_cache(tmp_path / "hub", "org/pipeline", pipeline, revision="v1")
    torch.save(unet.state_dict(), tmp_path / "expected.pt")
    script = """
import json, sys, torch
from app.nets import CheckpointError, resolve_model
expected = torch.load(sys.argv[1], weights_only=True)
out = {}
for ref in ("hf:org/name", "hf:org/pipeline@v1"):
    ckpt = resolve_model(ref)
    state = ckpt.unet.state_dict()
    out[ref] = [ckpt.name, ckpt.source, all(torch.equal(state[k], v) for k, v in expected.items())]
for ref in ("hf:org/absent", "hf:org/name@v2"):
    try:
        resolve_model(ref)
    except CheckpointError as e:
        out[ref] = str(e)
print(json.dumps(out))
"""
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "expected.pt")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["hf:org/name"] == ["name", "hf:org/name", True]
    assert out["hf:org/pipeline@v1"] == ["pipeline", "hf:org/pipeline@v1", True]
    for ref in ("hf:org/absent", "hf:org/name@v2"):
        assert out[ref].startswith(f"{ref}: cannot fetch from the Hugging Face Hub")
        assert "HF_HUB_OFFLINE" in out[ref] or "offline" in out[ref].lower()


class FakeHub:
    """snapshot_download over a repository whose branches move to the next commit after the first call: each
    call records (revision, allow_patterns) and copies the matching files of the commit into its snapshot
    folder, as huggingface_hub does."""

    def __init__(self, cache: Path, commits: dict[str, dict[str, bytes]]):
        self.cache, self.commits, self.calls = cache, commits, []
        # each resolution of a branch or tag finds the next commit, then the last one
        self.main = itertools.chain(commits, itertools.repeat(list(commits)[-1]))

    def __call__(self, repo_id, *, revision=None, allow_patterns=None):
        self.calls.append((revision, list(allow_patterns)))
        commit = revision if revision in self.commits else next(self.main)
        folder = self.cache / "snapshots" / commit
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in self.commits[commit].items():
            if any(fnmatch.fnmatchcase(name, p) for p in allow_patterns):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(content)
        return str(folder)


def saved_files(folder: Path, unet, weights: str = "diffusion_pytorch_model.safetensors") -> dict[str, bytes]:
    save_checkpoint(folder, unet, SCHEDULER)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    files[weights] = files.pop("diffusion_pytorch_model.safetensors")
    return files


def test_download_takes_every_file_from_the_commit_of_its_configs(tmp_path, monkeypatch, random_unet):
    import huggingface_hub

    first, second = "a" * 40, "b" * 40
    old, new = random_unet(seed=1), random_unet(seed=2)
    hub = FakeHub(
        tmp_path / "hub",
        {first: saved_files(tmp_path / "old", old), second: saved_files(tmp_path / "new", new)},
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    ckpt = resolve_model("hf:org/name")
    assert same_weights(ckpt.unet, old)
    assert [revision for revision, _ in hub.calls] == [None, first]


def test_download_falls_back_to_the_fp16_variant(tmp_path, monkeypatch, random_unet):
    import huggingface_hub

    unet = random_unet(seed=3).half()
    files = saved_files(tmp_path / "saved", unet, "diffusion_pytorch_model.fp16.safetensors")
    pipeline = {f"unet/{n}": files[n] for n in ("config.json", "diffusion_pytorch_model.fp16.safetensors")}
    pipeline |= {"scheduler/scheduler_config.json": files["scheduler_config.json"], "README.md": b"big"}
    hub = FakeHub(tmp_path / "hub", {"c" * 40: pipeline})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    ckpt = resolve_model("hf:org/pipeline@v1")
    assert {p.dtype for p in ckpt.unet.parameters()} == {torch.float32}
    assert same_weights(ckpt.unet.half(), unet)
    assert [patterns for _, patterns in hub.calls][1:] == [
        ["unet/diffusion_pytorch_model.safetensors"],
        ["unet/diffusion_pytorch_model.bin"],
        ["unet/diffusion_pytorch_model.fp16.safetensors"],
    ]
    assert not (tmp_path / "hub" / "snapshots" / ("c" * 40) / "README.md").exists()


def test_download_of_a_repository_without_weights_names_what_it_has(tmp_path, monkeypatch, random_unet):
    import huggingface_hub

    files = saved_files(tmp_path / "saved", random_unet())
    del files["diffusion_pytorch_model.safetensors"]
    files["diffusion_pytorch_model.safetensors.index.json"] = b"{}"
    files["diffusion_pytorch_model-00001-of-00002.safetensors"] = b"shard"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tmp_path / "hub", {"d" * 40: files}))
    with pytest.raises(
        CheckpointError, match=r"found diffusion_pytorch_model\.safetensors\.index\.json: sharded"
    ):
        resolve_model("hf:org/sharded")
