"""The paths the `ddpm` subcommands take: an output file of the wrong format is a usage error before any
work, and an input path of the wrong kind (a folder for a file, a file for a folder, missing, unreadable)
is one line naming the option and what it takes, never a traceback."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from PIL import Image

from app.cli import main
from app.nets import CheckpointError, SchedulerConfig, UNet
from app.nets.convert import convert_original_checkpoint, to_original_state_dict
from tests.tiny import TINY_CONFIG, save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"), timesteps=30)


def _fails(words: list[str]) -> str:
    """The one-line error (status 1) of `ddpm WORDS`."""
    with pytest.raises(SystemExit) as exit_:
        main(words)
    assert isinstance(exit_.value.code, str), exit_.value.code  # sys.exit(message): status 1
    return exit_.value.code


@pytest.mark.parametrize(
    ("words", "says"),
    [
        (["sample", "--out", "{tmp}/g.xyz"], "argument --out: {tmp}/g.xyz has suffix .xyz;"),
        (["sample", "--out", "{tmp}/g.jpg"], "the grid is written as a PNG: give a file name ending in .png"),
        (["sample", "--out", "{tmp}/grid"], "argument --out: {tmp}/grid has no suffix;"),
        (["sample", "--npy", "{tmp}/x.NPY"], "argument --npy: {tmp}/x.NPY has suffix .NPY;"),
        (["sample", "--npy", "{tmp}/x.npz"], "numpy.save: give a file name ending in .npy"),
        (["remote", "sample", "--out", "{tmp}/g.jpeg"], "argument --out: {tmp}/g.jpeg has suffix .jpeg"),
        (["remote", "sample", "--npy", "{tmp}/x.txt"], "argument --npy: {tmp}/x.txt has suffix .txt"),
        (
            ["remote", "interpolate", "--a-seed", "1", "--b-seed", "2", "--out", "{tmp}/i.webp"],
            "argument --out: {tmp}/i.webp has suffix .webp; the grid is written as a PNG",
        ),
        (["eval", "--npy", "{tmp}/x.txt"], "argument --npy: {tmp}/x.txt has suffix .txt"),
    ],
)
def test_an_output_file_of_another_format_is_a_usage_error(words, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([w.format(tmp=tmp_path) for w in words])
    assert exit_.value.code == 2 and says.format(tmp=tmp_path) in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_png_grid_may_be_named_in_capitals(tiny, tmp_path):
    out = tmp_path / "G.PNG"
    main(["sample", "--model", str(tiny), "--n", "1", "--steps", "1", "--device", "cpu", "--out", str(out)])
    assert Image.open(out).format == "PNG"


@pytest.fixture
def original_weights(tmp_path, monkeypatch):
    """A tiny preset `small` and its weights in the original key names."""
    from app.nets import presets

    cfg = replace(TINY_CONFIG, in_channels=3, out_channels=3)
    small = presets.Preset(
        name="small", unet=cfg, scheduler=SchedulerConfig(), hub_repo="none/none", description="test"
    )
    monkeypatch.setitem(presets.PRESETS, "small", small)
    path = tmp_path / "model.ckpt"
    torch.save(to_original_state_dict(UNet(cfg).state_dict(), cfg), path)
    return path


def test_convert_says_what_its_weights_must_be(tmp_path, tiny, original_weights):
    convert = ["convert", "--preset", "small", "--out", str(tmp_path / "o"), "--weights"]
    file = "give the original-format checkpoint file (.ckpt, .pt, .pth or .safetensors)"
    (tmp_path / "folder").mkdir()
    assert _fails([*convert, str(tmp_path / "folder")]) == (
        f"ddpm convert: --weights: {tmp_path / 'folder'} is a folder; {file}"
    )
    said = _fails([*convert, str(tiny)])
    assert f"--weights: {tiny} is a folder in the diffusers layout already" in said and "as --model" in said
    assert _fails([*convert, str(tmp_path / "none.ckpt")]).endswith(
        f"no such file {tmp_path}/none.ckpt; {file}"
    )
    (tmp_path / "notes.txt").write_text("hello\n")  # torch.load's unpickler fails on it with a KeyError
    said = _fails([*convert, str(tmp_path / "notes.txt")])
    assert said.startswith(f"ddpm convert: {tmp_path / 'notes.txt'}: not a readable PyTorch weights file (")
    assert "\n" not in said  # one line, no traceback
    assert not (tmp_path / "o").exists()
    # --out is checked before any converting
    said = _fails(
        ["convert", "--preset", "small", "--weights", str(original_weights), "--out", str(original_weights)]
    )
    assert said == f"ddpm convert: --out {original_weights} is a file; give a folder"
    with pytest.raises(CheckpointError, match=r"folder: a folder, not a weights file \(\.safetensors"):
        convert_original_checkpoint(tmp_path / "folder", tmp_path / "o", preset="small")


def test_convert_recognises_tensorflow_checkpoints(tmp_path, original_weights):
    for suffix in ("data-00000-of-00001", "index", "meta"):
        (tmp_path / f"model.ckpt-790000.{suffix}").write_bytes(b"\x00\x01")
    convert = ["convert", "--preset", "small", "--out", str(tmp_path / "o"), "--weights"]
    for weights in ("model.ckpt-790000", "model.ckpt-790000.index"):  # the prefix names the three files
        said = _fails([*convert, str(tmp_path / weights)])
        assert said.startswith(f"ddpm convert: --weights: {tmp_path / weights}: a TensorFlow checkpoint, not")
        assert "converted to PyTorch first" in said and "pesser/pytorch_diffusion" in said
    assert not (tmp_path / "o").exists()


def test_convert_given_the_current_folder_says_it_is_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "." has no name: the TensorFlow check must not trip on it
    said = _fails(["convert", "--preset", "small", "--out", str(tmp_path / "o"), "--weights", "."])
    assert said.startswith("ddpm convert: --weights: ") and "folder" in said, said


def test_an_unreadable_input_file_is_named(tmp_path, original_weights, monkeypatch):
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: str(p) != str(original_weights) and access(p, mode))
    said = _fails(
        ["convert", "--preset", "small", "--weights", str(original_weights), "--out", str(tmp_path / "o")]
    )
    assert said == f"ddpm convert: --weights: {original_weights} is not readable"


def test_model_references_that_mix_up_files_and_folders(tiny, tmp_path):
    sample = ["sample", "--n", "1", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "g.png")]
    weights = tiny / "diffusion_pytorch_model.safetensors"
    said = _fails([*sample, "--model", str(weights)])
    assert said.startswith(f"ddpm sample: --model: {weights} is a file; give a checkpoint folder")
    assert f"or PRESET:{weights} for a weights file (PRESET one of cifar10," in said
    said = _fails([*sample, "--model", f"cifar10:{tiny}"])
    assert said.startswith(f"ddpm sample: --model: {tiny} is a folder; cifar10:WEIGHTS takes a weights file")
    (tmp_path / "notes.pt").write_text("hello\n")  # torch.load's unpickler fails on it with a KeyError
    said = _fails([*sample, "--model", f"cifar10:{tmp_path / 'notes.pt'}"])
    assert said.startswith(f"ddpm sample: {tmp_path / 'notes.pt'}: not a readable PyTorch weights file (")
    run = tmp_path / "run"
    save_tiny(run / "model")  # what `ddpm train --out run` leaves (beside state.pt)
    said = _fails([*sample, "--model", str(run)])
    assert said == f"ddpm sample: --model: {run} is a training run folder; its model is {run / 'model'}"
    said = _fails(["eval", "--model", str(weights), "--n", "1", "--device", "cpu"])
    assert said.startswith(f"ddpm eval: --model: {weights} is a file; give a checkpoint folder")
    assert not (tmp_path / "g.png").exists()


def test_init_from_must_be_a_checkpoint_folder(tiny, tmp_path):
    train = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "new"), "--steps", "1"]
    folder = "give a checkpoint folder (config.json, scheduler_config.json and the weights)"
    weights = tiny / "diffusion_pytorch_model.safetensors"
    assert (
        _fails([*train, "--init-from", str(weights)])
        == f"ddpm train: --init-from: {weights} is a file; {folder}"
    )
    said = _fails([*train, "--init-from", str(tmp_path / "none")])
    assert said == f"ddpm train: --init-from: no such folder {tmp_path / 'none'}; {folder}"
    save_tiny(tmp_path / "old" / "model")  # what `ddpm train --out old` leaves (beside state.pt)
    old = tmp_path / "old"
    said = _fails([*train, "--init-from", str(old)])
    assert said == f"ddpm train: --init-from: {old} is a training run folder; its model is {old / 'model'}"
    assert not (tmp_path / "new").exists()  # refused before the data is read


def test_a_resumed_run_does_not_need_its_init_from_any_more(tmp_path):
    import numpy as np

    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8), np.uint8))
    words = ["train", "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "run"), "--ch", "32"]
    words += ["--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-resolutions", "4", "--steps", "1"]
    words += ["--batch-size", "4", "--preview-every", "0", "--device", "cpu"]
    main(words)
    main([*words, "--init-from", str(tmp_path / "moved-away")])  # state.pt is there: it resumes (at the end)
    assert (tmp_path / "run" / "state.pt").is_file()


def test_eval_says_what_its_classifier_must_be(tmp_path, tiny):
    evaluate = ["eval", "--real", "--n", "4", "--device", "cpu", "--classifier"]
    folder = "give a classifier folder (config.json and model.safetensors), as train-classifier writes"
    (tmp_path / "notes.txt").write_text("")
    said = _fails([*evaluate, str(tmp_path / "notes.txt")])
    assert said == f"ddpm eval: --classifier: {tmp_path / 'notes.txt'} is a file; {folder}"
    said = _fails([*evaluate, str(tmp_path / "none")])
    assert said == f"ddpm eval: --classifier: no such folder {tmp_path / 'none'}; {folder}"
    said = _fails([*evaluate, str(tiny)])  # a DDPM: a config.json, but no model.safetensors
    assert said == f"ddpm eval: --classifier: {tiny} has no model.safetensors; {folder}"
    said = _fails([*evaluate, str(tmp_path)])
    assert said == f"ddpm eval: --classifier: {tmp_path} has no config.json and model.safetensors; {folder}"


def test_an_interpolation_end_must_be_an_image_file(tmp_path):
    # Refused before the server is called: there is none at this address.
    words = ["remote", "interpolate", "--url", "http://127.0.0.1:9", "--b-seed", "2"]
    said = _fails([*words, "--a", str(tmp_path), "--out", str(tmp_path / "i.png")])
    image = "give an image file of the model's size and channels"
    assert said == f"ddpm remote interpolate: --a: {tmp_path} is a folder; {image}"
