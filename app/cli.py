"""Command-line entry points: `ddpm` (sample / train / convert / remote), `ddpm-serve`, `ddpm-worker`."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from app.argtypes import (
    check_input_file,
    check_model_folder,
    check_model_ref,
    check_output_file,
    check_output_folder,
    check_sampler_options,
    decay,
    device,
    eta,
    non_negative_int,
    npy_file,
    png_file,
    positive_float,
    positive_int,
)

if TYPE_CHECKING:
    from app.client import Client, DDPMError, Job, Model

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "mnist"


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _tuple(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _sample(args: argparse.Namespace) -> None:
    from app.diffusion.samplers import timesteps
    from app.images import make_grid, save_png
    from app.nets import resolve_model
    from app.sampling import generate

    check_output_file(args.out, "--out")
    check_output_file(args.npy, "--npy")
    check_sampler_options(args)
    check_model_ref(args.model, "--model")
    ckpt = resolve_model(args.model, device=args.device)
    steps = args.steps or ckpt.scheduler.num_train_timesteps
    timesteps(ckpt.scheduler.num_train_timesteps, steps)  # its range check, before the progress bar
    with tqdm(total=steps, desc=f"{args.sampler} ×{args.n}", unit="step", dynamic_ncols=True) as bar:
        result = generate(
            ckpt,
            n=args.n,
            steps=steps,
            sampler=args.sampler,
            eta=args.eta,
            variance=args.variance,
            clip_denoised=not args.no_clip,
            seed=args.seed,
            callback=lambda *_: bar.update(1),
        )
    save_png(args.out, make_grid(result.images))
    if args.npy:
        np.save(args.npy, result.images.numpy().astype(np.float32))
    print(f"{args.out}: {args.n} images, seed {result.seed}, {steps} steps")


def _train(args: argparse.Namespace) -> None:
    from app.training.train import StopNow, TrainConfig, Trainer

    check_output_folder(args.out, "--out")
    if args.init_from and not (Path(args.out) / "state.pt").exists():  # a resumed run does not read it
        check_model_folder(args.init_from, "--init-from")
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise ValueError(f"--max-minutes must be positive, got {args.max_minutes}")
    max_seconds = None if args.max_minutes is None else 60 * args.max_minutes
    trainer = Trainer(TrainConfig(**fields))
    again = shlex.join(["ddpm", *args.argv])
    try:
        model = trainer.run(max_seconds=max_seconds)
    except StopNow:  # Ctrl-C twice
        held = trainer.saved_step
        if held == trainer.step:  # it came while a checkpoint was written: nothing lost
            where = f"saved in {args.out}; the same command resumes: {again}"
        elif held is None:
            where = "nothing saved"
        else:
            where = f"unsaved; {args.out} holds step {held}; the same command resumes: {again}"
        raise KeyboardInterrupt(f"again: stopped at once at step {trainer.step}, {where}") from None
    except FloatingPointError as e:  # a NaN/inf loss or gradient: stopped before the update, one line
        held = (
            "nothing saved" if trainer.saved_step is None else f"{args.out} holds step {trainer.saved_step}"
        )
        raise ValueError(f"{e}; {held}") from None
    if trainer.stopped_by == signal.SIGINT and trainer.step < trainer.cfg.steps:
        # Saved like a SIGTERM, but a Ctrl-C ends as main() ends every command on one: status 130.
        # (SIGTERM, how a scheduler or `kill` stops a run, stays a clean stop with status 0.)
        raise KeyboardInterrupt(
            f"at step {trainer.step} of {trainer.cfg.steps}, saved in {args.out}; "
            f"the same command resumes: {again}"
        )
    print(f"EMA weights: {model}")


def _convert(args: argparse.Namespace) -> None:
    from app.nets.checkpoint import tensorflow_checkpoint, tensorflow_checkpoint_error
    from app.nets.convert import ORIGINAL_WEIGHTS_FILE, convert_original_checkpoint

    if tensorflow_checkpoint(args.weights):  # model.ckpt-790000 names the .index, .meta and .data files
        raise tensorflow_checkpoint_error(f"--weights: {args.weights}")
    weights = Path(args.weights)
    if weights.is_dir() and (weights / "config.json").is_file():
        raise ValueError(
            f"--weights: {weights} is a folder in the diffusers layout already (config.json): it needs no "
            f"converting, give it as --model; convert takes {ORIGINAL_WEIGHTS_FILE}"
        )
    check_input_file(args.weights, "--weights", ORIGINAL_WEIGHTS_FILE)
    check_output_folder(args.out, "--out")
    convert_original_checkpoint(args.weights, args.out, preset=args.preset)
    print(f"{args.out}: converted {args.weights} ({args.preset})")


def _remote_job(ddpm: Client, create: Callable[[], Job], desc: str) -> Job:
    """Create a remote job and follow its stream with a progress bar; the job once it has succeeded.
    Ctrl-C cancels the job (once the server has named it); an error names the job and where to see it."""
    from app.client import DDPMError, Job

    job = None
    try:
        job = create()
        with tqdm(total=job.steps or None, desc=desc, unit="step", dynamic_ncols=True) as bar:
            for event in ddpm.stream(job):
                if isinstance(event, Job):
                    job = event
                    bar.update(job.step - bar.n)
                else:
                    bar.total = event.steps
                    bar.update(event.step - bar.n)
    except KeyboardInterrupt:
        if job is None:  # the POST had not answered: no id to cancel
            raise
        raise KeyboardInterrupt(_cancel(ddpm, job)) from None
    except DDPMError as e:
        if job is None:
            raise
        raise _about_job(e, ddpm, job, "may still be running") from e
    if job.status != "succeeded":
        error = job.error or {"code": job.status, "message": f"the job was {job.status}"}
        raise DDPMError(0, error["code"], f"job {job.id}: {error['message']}")
    return job


def _cancel(ddpm: Client, job: Job) -> str:
    """Cancel a job the user interrupted; what became of it, for the "interrupted" line (a failure to
    cancel is a warning there: the exit status stays that of Ctrl-C)."""
    from app.client import DDPMError

    try:
        job = ddpm.cancel(job)
    except DDPMError as e:
        where = _job_url(ddpm, job)
        return f"(warning: job {job.id} was not cancelled: {e}; it may still be running: see {where})"
    return f"(job {job.id} {job.status})"  # cancelled, or how it ended if it ended first


def _job_url(ddpm: Client, job: Job) -> str:
    return f"{ddpm.url}/jobs/{job.id}"


def _about_job(error: DDPMError, ddpm: Client, job: Job, state: str) -> DDPMError:
    """`error`, saying which job it concerns and where to see it."""
    from app.client import DDPMError

    note = f"{error.message}; job {job.id} {state}: see {_job_url(ddpm, job)}"
    return DDPMError(error.status, error.code, note, details=error.details, attempts=error.attempts)


def _previews(steps: int) -> int:
    # About 50 previews whatever the length: enough for a smooth bar, little to transfer.
    return max(1, steps // 50)


def _model(ddpm: Client, name: str | None) -> Model | None:
    """The named (or default) model of the server; None if it has no such model (the job will say so)."""
    models = ddpm.models()
    return next((m for m in models if m.name == name or (name is None and m.default)), None)


def _most_steps(model: Model | None) -> int:
    """The most steps the server runs of `model` (T, or its DDPM_MAX_STEPS if less): the default of
    `steps`, for the previews' spacing. 1000 (the paper's T) when the server does not say."""
    if model is None:
        return 1000
    return min(model.timesteps, model.max_steps or model.timesteps)


def _remote_sample(args: argparse.Namespace) -> None:
    check_output_file(args.out, "--out")
    check_output_file(args.npy, "--npy")
    check_sampler_options(args)
    with _client(args.url) as ddpm:
        model = _model(ddpm, args.model)
        steps = args.steps or _most_steps(model)  # the server's default: as many as it allows
        options = {"steps": args.steps, "sampler": args.sampler, "seed": args.seed, "model": args.model}
        if args.sampler == "ddim":
            options["eta"] = args.eta
        options = {k: v for k, v in options.items() if v is not None}
        create = partial(ddpm.sample, args.n, stream_every=_previews(steps), **options)
        job = _remote_job(ddpm, create, f"{args.sampler} ×{args.n}")
        with _downloading(ddpm, job):
            ddpm.grid(job).save(args.out, format="PNG")
            if args.npy:
                np.save(args.npy, ddpm.images(job))
    floats = f", floats in {args.npy}" if args.npy else ""
    print(f"{args.out}: {args.n} images, seed {job.seed}, {job.steps} steps, job {job.id}{floats}")


@contextmanager
def _downloading(ddpm: Client, job: Job) -> Iterator[None]:
    """A failed download of a succeeded job's results says which job it was."""
    from app.client import DDPMError

    try:
        yield
    except DDPMError as e:
        raise _about_job(e, ddpm, job, "succeeded") from e


def _interpolation_end(path: str | None, seed: int | None, flag: str) -> Path | int:
    if path is None:
        return seed
    check_input_file(path, flag, "an image file of the model's size and channels")
    return Path(path)


def _client(url: str) -> Client:
    from app.client import Client

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request
    return Client(url)


def _remote_interpolate(args: argparse.Namespace) -> None:
    check_output_file(args.out, "--out")
    a = _interpolation_end(args.a, args.a_seed, "--a")
    b = _interpolation_end(args.b, args.b_seed, "--b")
    t = list(args.t) if args.t and len(args.t) > 1 else args.t[0] if args.t else None
    with _client(args.url) as ddpm:
        model = _model(ddpm, args.model)
        timesteps = model.timesteps if model else 1000
        default_t = max(1, min(timesteps // 2, _most_steps(model)))  # the server's: T/2 or its limit
        # The job's steps: seed ends are sampled first (all T steps), then the decoding from t.
        seeded = isinstance(a, int) or isinstance(b, int)
        steps = (timesteps if seeded else 0) + (args.steps or max(args.t or [default_t]))
        options = {"model": args.model, "steps": args.steps, "seed": args.seed, "t": t}
        options = {k: v for k, v in options.items() if v is not None}
        create = partial(ddpm.interpolate, a, b, num=args.num, stream_every=_previews(steps), **options)
        job = _remote_job(ddpm, create, f"interpolate ×{args.num}")
        with _downloading(ddpm, job):
            ddpm.grid(job).save(args.out, format="PNG")
    print(f"{args.out}: {job.result['rows']} × {job.result['columns']} images (t × λ), job {job.id}")


def _add_remote(sub) -> None:
    r = sub.add_parser("remote", help="use a running ddpm-serve over HTTP (API key: $DDPM_API_KEY)")
    remote = r.add_subparsers(dest="remote_command", required=True)
    url = {
        "default": os.environ.get("DDPM_URL", "http://127.0.0.1:8000"),
        "help": "server URL (default: $DDPM_URL or http://127.0.0.1:8000)",
    }

    s = remote.add_parser("sample", help="sample on the server, with a progress bar, to a PNG grid")
    s.add_argument("--url", **url)
    s.add_argument("--model", default=None, help="model name (default: the server's default)")
    s.add_argument("--n", type=positive_int, default=16, help="number of images (default 16)")
    s.add_argument("--steps", type=positive_int, default=None, help="reverse steps, 1..T (default: T)")
    s.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    s.add_argument("--eta", type=eta, default=0.0, help="DDIM η in [0, 1] (ddim only; default 0)")
    s.add_argument("--seed", type=int, default=None, help="default: random, reported at the end")
    s.add_argument("--out", type=png_file, default="samples.png", help="PNG grid (default samples.png)")
    s.add_argument(
        "--npy", type=npy_file, default=None, help="also save float32 (n, C, H, W) values in [-1, 1] (.npy)"
    )
    s.set_defaults(func=_remote_sample)

    i = remote.add_parser("interpolate", help="interpolate between two images or seeds at t (Fig. 8)")
    i.add_argument("--url", **url)
    i.add_argument("--model", default=None, help="model name (default: the server's default)")
    for side in ("a", "b"):
        end = i.add_mutually_exclusive_group(required=True)
        end.add_argument(f"--{side}", help=f"end {side}: an image file of the model's size and channels")
        end.add_argument(f"--{side}-seed", type=int, help=f"end {side}: a fresh sample drawn with this seed")
    i.add_argument("--t", type=_tuple, default=None, help="t, or several (100,500,900): one row each")
    i.add_argument("--num", type=positive_int, default=8, help="number of λ, evenly spread over [0, 1]")
    i.add_argument("--steps", type=positive_int, default=None, help="reverse steps from t (default: all)")
    i.add_argument("--seed", type=int, default=None, help="default: random")
    i.add_argument("--out", type=png_file, default="interpolation.png", help="PNG grid, rows t, columns λ")
    i.set_defaults(func=_remote_interpolate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpm", description="Denoising Diffusion Probabilistic Models.")
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        default="INFO",
        help="default INFO",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample images to a PNG grid (Algorithm 2 or DDIM)")
    s.add_argument(
        "--model",
        default=str(BUNDLED_MODEL),
        help="folder, PRESET:WEIGHTS or hf:REPO (default: the bundled MNIST model)",
    )
    s.add_argument("--n", type=positive_int, default=16, help="number of images (default 16)")
    s.add_argument("--steps", type=positive_int, default=None, help="reverse steps, 1..T (default: T)")
    s.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    s.add_argument("--eta", type=eta, default=0.0, help="DDIM η in [0, 1] (ddim only; default 0)")
    s.add_argument(
        "--variance",
        choices=("beta", "posterior"),
        default=None,
        help="DDPM σ²: β_t or β̃_t (default: the checkpoint's)",
    )
    s.add_argument("--no-clip", action="store_true", help="do not clip x̂₀ to [-1, 1]")
    s.add_argument("--seed", type=int, default=None, help="default: random, reported at the end")
    s.add_argument("--device", type=device, default=best_device(), help="cpu, cuda or cuda:N")
    s.add_argument("--out", type=png_file, default="samples.png", help="PNG grid (default samples.png)")
    s.add_argument(
        "--npy", type=npy_file, default=None, help="also save float32 (n, C, H, W) values in [-1, 1] (.npy)"
    )
    s.set_defaults(func=_sample)

    t = sub.add_parser("train", help="train a DDPM with Algorithm 1 (resumes if --out has a run)")
    t.add_argument("--data", required=True, help="IDX folder/file (MNIST), image folder or .npz")
    t.add_argument("--out", required=True, help="run folder: state.pt, model/, previews/")
    t.add_argument("--resolution", type=positive_int, help="pad images to this size")
    t.add_argument("--ch", type=positive_int, help="base channels (default 32)")
    t.add_argument("--ch-mult", dest="ch_mult", type=_tuple)
    t.add_argument("--num-res-blocks", dest="num_res_blocks", type=positive_int)
    t.add_argument("--attn-resolutions", dest="attn_resolutions", type=_tuple)
    t.add_argument("--dropout", type=decay, help="in [0, 1) (default 0.1)")
    t.add_argument(
        "--norm-groups",
        dest="norm_num_groups",
        type=positive_int,
        help="GroupNorm groups (default min(32, ch/4): 8 for --ch 32; a resumed run keeps its own)",
    )
    t.add_argument("--beta-schedule", dest="beta_schedule", choices=("linear", "cosine"))
    t.add_argument("--variance-type", dest="variance_type", choices=("fixed_large", "fixed_small"))
    t.add_argument("--steps", type=positive_int, help="training steps in all (default 10,000)")
    t.add_argument("--batch-size", dest="batch_size", type=positive_int, help="default 128")
    t.add_argument("--lr", type=positive_float, help="Adam learning rate (default 2e-4)")
    t.add_argument("--warmup", type=non_negative_int, help="linear warm-up steps of the lr (default 500)")
    t.add_argument(
        "--grad-clip", dest="grad_clip", type=positive_float, help="gradient norm clip (default 1.0)"
    )
    t.add_argument("--ema-decay", dest="ema_decay", type=decay, help="in [0, 1) (default 0.999)")
    t.add_argument("--hflip", action="store_true", default=None)
    t.add_argument("--seed", type=int)
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=positive_int, help="steps")
    t.add_argument("--preview-every", dest="preview_every", type=non_negative_int, help="steps; 0: none")
    t.add_argument(
        "--init-from", dest="init_from", help="start a new run from the weights of this checkpoint folder"
    )
    t.add_argument("--device", type=device, default=best_device(), help="cpu, cuda or cuda:N")
    t.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="autocast dtype (default float32); bfloat16 is faster on CUDA and on CPUs with AVX-512 BF16 "
        "or AMX, emulated and slower elsewhere; weights, Adam and the EMA stay float32",
    )
    t.add_argument(
        "--max-minutes",
        dest="max_minutes",
        type=float,
        help="stop (saved, resumable with the same command) after this much wall time",
    )
    t.set_defaults(func=_train)

    c = sub.add_parser("convert", help="convert an original-format checkpoint to the diffusers layout")
    c.add_argument("--preset", required=True, help="cifar10, celebahq, church, bedroom or cat")
    c.add_argument("--weights", required=True, help="the original .ckpt/.pth/.safetensors")
    c.add_argument("--out", required=True)
    c.set_defaults(func=_convert)
    _add_remote(sub)

    from app.evaluation.cli import add_parsers

    add_parsers(sub)  # train-classifier, eval
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command's words, for `ddpm train` to tell how to resume
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.client import DDPMError
    from app.nets import CheckpointError
    from app.training.data import DataError

    command = " ".join(filter(None, (args.command, getattr(args, "remote_command", None))))
    try:
        args.func(args)
    except (CheckpointError, DataError, DDPMError, ValueError, OSError) as e:
        sys.exit(f"ddpm {command}: {e}")
    except KeyboardInterrupt as e:  # Ctrl-C; a command may say more (train: the step saved, how to resume)
        print(f"ddpm {command}: interrupted" + (f" {e}" if str(e) else ""), file=sys.stderr)
        sys.exit(130)


def serve_main(argv: list[str] | None = None) -> None:
    """`ddpm-serve [--model REF]... [--host H] [--port P] [--device D]` (see app/serve.py)."""
    from app.serve import main as serve

    serve(argv)


def worker_main(argv: list[str] | None = None) -> None:
    """`ddpm-worker [--model REF]... [--device D] [--name N] [--metrics-port P]` (see app/worker/main.py)."""
    from app.worker.main import main as work

    work(argv)


if __name__ == "__main__":
    main()
