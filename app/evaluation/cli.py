"""`ddpm train-classifier` and `ddpm eval`: the quality table of the model card (IS, FID, classes).

`add_parsers(sub)` registers both subcommands on the `ddpm` subparsers; each sets `func`.
Run them as `ddpm train-classifier …` and `ddpm eval …` (app/cli.py: one error line, no traceback).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from app.argtypes import (
    check_input_folder,
    check_model_ref,
    check_output_file,
    check_output_folder,
    check_sampler_options,
    device,
    eta,
    npy_file,
    positive_int,
)
from app.training.data import SHARED_MNIST

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "mnist"
DEFAULT_CLASSIFIER = REPO / "models" / "mnist-classifier"
DEFAULT_DATA = SHARED_MNIST
TABLE_HEADER = (
    "| samples | n | IS ↑ | FID ↓ | classes present | mean confidence | command |\n"
    "|---|---|---|---|---|---|---|"
)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train-classifier", help="train the MNIST classifier that IS/FID are measured with")
    t.add_argument(
        "--data", required=True, help="labelled MNIST IDX folder: first 8,000 train, last 2,000 held out"
    )
    t.add_argument("--out", required=True, help="output folder, e.g. models/mnist-classifier")
    t.add_argument("--epochs", type=positive_int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", type=device, default=_device())
    t.set_defaults(func=_train_classifier)

    e = sub.add_parser("eval", help="IS, FID, class counts and confidence of samples (or of real digits)")
    e.add_argument("--model", default=str(DEFAULT_MODEL), help="a DDPM: folder, PRESET:WEIGHTS or hf:REPO")
    e.add_argument("--real", action="store_true", help="score the real digits instead: IS and the FID floor")
    e.add_argument("--n", type=positive_int, default=1000, help="number of samples")
    e.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    e.add_argument("--steps", type=positive_int, default=None, help="reverse steps (default: T)")
    e.add_argument(
        "--variance",
        choices=("beta", "posterior"),
        default=None,
        help="DDPM σ²: β_t or β̃_t (default: the checkpoint's)",
    )
    e.add_argument("--eta", type=eta, default=0.0, help="DDIM η in [0, 1]")
    e.add_argument("--seed", type=int, default=0, help="batch b is sampled with seed image_seed(seed, b)")
    e.add_argument("--batch-size", type=positive_int, default=250)
    e.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER), help="a folder of train-classifier")
    e.add_argument("--data", default=str(DEFAULT_DATA), help="real digits: the FID reference")
    e.add_argument("--device", type=device, default=_device())
    e.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="U-Net autocast dtype, as the engine's DDPM_DTYPE (bfloat16 needs a CPU with AVX-512 BF16 "
        "or AMX to be fast; float16 is CUDA-only)",
    )
    e.add_argument("--channels-last", action="store_true", help="NHWC activations, as DDPM_CHANNELS_LAST")
    e.add_argument(
        "--compile", action="store_true", help="torch.compile the U-Net for the batch sizes, as DDPM_COMPILE"
    )
    e.add_argument("--json", default=None, help="also write the figures to this JSON file")
    e.add_argument(
        "--npy", type=npy_file, default=None, help="also save the samples: float32 (n, C, H, W) in [-1, 1]"
    )
    e.set_defaults(func=_eval)


def _train_classifier(args: argparse.Namespace) -> None:
    from app.evaluation.train_classifier import ClassifierTraining, train_classifier

    check_output_folder(args.out, "--out")
    words = ["ddpm", "train-classifier", "--data", args.data, "--out", args.out]
    words += ["--epochs", str(args.epochs), "--seed", str(args.seed), "--device", args.device]
    command = shlex.join(words)
    cfg = ClassifierTraining(
        data=args.data, out=args.out, epochs=args.epochs, seed=args.seed, device=args.device
    )
    _, record = train_classifier(cfg, command=command)
    print(
        f"{args.out}: held-out accuracy {record['heldout_accuracy']:.2%} "
        f"({record['split']['heldout']}), {record['wall_time_s']} s"
    )


def _eval(args: argparse.Namespace) -> None:
    from app.evaluation.classifier import CONFIG_NAME, WEIGHTS_NAME, load_classifier
    from app.evaluation.metrics import evaluate, evaluate_real
    from app.training.data import load_images

    check_output_file(args.json, "--json")
    check_output_file(args.npy, "--npy")
    sampling = ["--npy"] * bool(args.npy) + [w for w in _fast_path_words(args) if w.startswith("--")]
    sampling += [option for option, given in _sampling_options(args).items() if given]
    if args.real and sampling:
        raise ValueError(f"{', '.join(sampling)}: for samples of a model, not with --real")
    check_sampler_options(args)
    if not args.real:
        check_model_ref(args.model, "--model")
    expected = f"a classifier folder ({CONFIG_NAME} and {WEIGHTS_NAME}), as train-classifier writes"
    check_input_folder(args.classifier, "--classifier", expected, holding=(CONFIG_NAME, WEIGHTS_NAME))
    classifier = load_classifier(args.classifier, device=args.device)
    real = load_images(args.data)
    if args.real and not 2 <= args.n <= len(real) // 2:
        raise ValueError(
            f"--n {args.n}: with --real, the FID floor compares --n of the {len(real) // 2:,} odd-indexed "
            f"digits of --data with the even ones; give --n in 2..{len(real) // 2}"
        )
    if args.real:
        report = evaluate_real(real, classifier, subset=args.n, batch_size=args.batch_size)
        label = f"real digits ({report['fid_halves'][0]:,} vs {report['fid_halves'][1]:,} for FID)"
        command = shlex.join(["ddpm", "eval", "--real", "--n", str(args.n), "--data", args.data])
    else:
        from app.evaluation.classifier import classify
        from app.evaluation.metrics import gaussian_stats

        images, label, command = _sample(args)
        if args.npy:
            np.save(args.npy, images.numpy().astype(np.float32))
        reference = gaussian_stats(classify(classifier, real, batch_size=args.batch_size)[0])
        report = evaluate(images, classifier, reference, reference_images=real, batch_size=args.batch_size)
    report["command"] = command
    counts = report["class_counts"]
    print(f"IS {report['is']:.3f}  FID {report['fid']:.3f}  mean confidence {report['mean_confidence']:.4f}")
    if "fid_subset" in report:
        print(
            f"FID floor for {report['subset']:,} samples: {report['fid_subset']:.3f} "
            f"({report['subset']:,} odd vs {report['fid_halves'][1]:,} even digits)"
        )
    if "nn_distance" in report:
        against = "the other real digits" if args.real else "the real digits"
        print(f"median L2 pixel distance to the nearest of {against}: {report['nn_distance']:.3f}")
    print("class counts " + "  ".join(f"{k}:{c}" for k, c in enumerate(counts)))
    print(TABLE_HEADER)
    present = sum(c > 0 for c in counts)
    print(
        f"| {label} | {report['n']:,} | {report['is']:.2f} | {report['fid']:.2f} | {present}/{len(counts)} "
        f"| {report['mean_confidence']:.3f} | `{command}` |"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def _sampling_options(args: argparse.Namespace) -> dict[str, bool]:
    """Whether each option of the sampling was given (differs from its default): with --real, which
    samples nothing, they would be ignored without a word."""
    return {
        "--model": args.model != str(DEFAULT_MODEL),
        "--sampler": args.sampler != "ddpm",
        "--steps": args.steps is not None,
        "--variance": args.variance is not None,
        "--eta": args.eta != 0,
        "--seed": args.seed != 0,
    }


def _fast_path_words(args: argparse.Namespace) -> list[str]:
    """The command-line words of the engine fast path asked for; none for the plain float32 U-Net."""
    words = ["--dtype", args.dtype] * (args.dtype != "float32")
    return words + ["--channels-last"] * args.channels_last + ["--compile"] * args.compile


def _sample(args: argparse.Namespace) -> tuple[torch.Tensor, str, str]:
    """`args.n` samples in batches of `args.batch_size`, with the table label and command that made them."""
    from app.engine.fastpath import FastPath, Forward
    from app.nets import resolve_model
    from app.rng import image_seed
    from app.sampling import default_variance, generate

    ckpt = resolve_model(args.model, device=args.device)
    if ckpt.channels != 1:
        raise ValueError(f"{args.model}: makes {ckpt.channels}-channel images; the classifier needs 1")
    steps = args.steps or ckpt.scheduler.num_train_timesteps
    sizes = [min(args.batch_size, args.n - i) for i in range(0, args.n, args.batch_size)]
    fast_words = _fast_path_words(args)
    model = None  # the plain float32 U-Net, unless a fast path is asked for
    if fast_words:
        fast = FastPath(args.channels_last, args.dtype, args.compile, buckets=tuple(sizes))
        model = Forward(ckpt.unet, fast, device=torch.device(args.device), max_batch=args.batch_size)
    images = []
    bar = tqdm(total=len(sizes) * steps, desc=f"{args.sampler} ×{args.n}", unit="step", dynamic_ncols=True)
    with bar:
        for b, size in enumerate(sizes):
            bar.set_postfix(batch=f"{b + 1}/{len(sizes)}")
            result = generate(
                ckpt,
                n=size,
                steps=steps,
                sampler=args.sampler,
                eta=args.eta,
                variance=args.variance,
                seed=image_seed(args.seed, b),
                callback=lambda *_: bar.update(1),
                model=model,
            )
            images.append(result.images)
    words = ["ddpm", "eval", "--model", args.model, "--n", str(args.n)]
    words += ["--sampler", args.sampler, "--steps", str(steps)]
    if args.sampler == "ddpm":
        variance = str(args.variance or default_variance(ckpt))
        label = f"{steps}-step ancestral, σ²={'β' if variance == 'beta' else 'β̃'}"
        words += ["--variance", variance]
    else:
        label = f"DDIM {steps} steps, η={args.eta:g}"
        words += ["--eta", f"{args.eta:g}"]
    words += ["--seed", str(args.seed), "--batch-size", str(args.batch_size)]
    words += fast_words
    label += f", {args.dtype}" * (args.dtype != "float32")
    return torch.cat(images), label, shlex.join(words)
