"""Command-line entry points: `ddpm` (sample / train / convert), `ddpm-serve`, `ddpm-worker`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "mnist"


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _tuple(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _sample(args: argparse.Namespace) -> None:
    from app.images import make_grid, save_png
    from app.nets import resolve_model
    from app.sampling import generate

    ckpt = resolve_model(args.model, device=args.device)
    steps = args.steps or ckpt.scheduler.num_train_timesteps
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
    from app.training.train import TrainConfig, Trainer

    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    model = Trainer(TrainConfig(**fields)).run()
    print(f"EMA weights: {model}")


def _convert(args: argparse.Namespace) -> None:
    from app.nets.convert import convert_original_checkpoint

    convert_original_checkpoint(args.weights, args.out, preset=args.preset)
    print(f"{args.out}: converted {args.weights} ({args.preset})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpm", description="Denoising Diffusion Probabilistic Models.")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample images to a PNG grid (Algorithm 2 or DDIM)")
    s.add_argument(
        "--model",
        default=str(BUNDLED_MODEL),
        help="folder, PRESET:WEIGHTS or hf:REPO (default: the bundled MNIST model)",
    )
    s.add_argument("--n", type=int, default=16)
    s.add_argument("--steps", type=int, default=None, help="reverse steps (default: T)")
    s.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM η")
    s.add_argument(
        "--variance",
        choices=("beta", "posterior"),
        default=None,
        help="DDPM σ²: β_t or β̃_t (default: the checkpoint's)",
    )
    s.add_argument("--no-clip", action="store_true", help="do not clip x̂₀ to [-1, 1]")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--device", default=best_device())
    s.add_argument("--out", default="samples.png")
    s.add_argument("--npy", default=None, help="also save float32 (n, C, H, W) values in [-1, 1]")
    s.set_defaults(func=_sample)

    t = sub.add_parser("train", help="train a DDPM with Algorithm 1 (resumes if --out has a run)")
    t.add_argument("--data", required=True, help="IDX folder/file (MNIST), image folder or .npz")
    t.add_argument("--out", required=True, help="run folder: state.pt, model/, previews/")
    t.add_argument("--resolution", type=int, help="pad images to this size")
    t.add_argument("--ch", type=int)
    t.add_argument("--ch-mult", dest="ch_mult", type=_tuple)
    t.add_argument("--num-res-blocks", dest="num_res_blocks", type=int)
    t.add_argument("--attn-resolutions", dest="attn_resolutions", type=_tuple)
    t.add_argument("--dropout", type=float)
    t.add_argument("--beta-schedule", dest="beta_schedule", choices=("linear", "cosine"))
    t.add_argument("--variance-type", dest="variance_type", choices=("fixed_large", "fixed_small"))
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", dest="batch_size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup", type=int)
    t.add_argument("--grad-clip", dest="grad_clip", type=float)
    t.add_argument("--ema-decay", dest="ema_decay", type=float)
    t.add_argument("--hflip", action="store_true", default=None)
    t.add_argument("--seed", type=int)
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    t.add_argument("--preview-every", dest="preview_every", type=int)
    t.add_argument("--device", default=best_device())
    t.set_defaults(func=_train)

    c = sub.add_parser("convert", help="convert an original-format checkpoint to the diffusers layout")
    c.add_argument("--preset", required=True, help="cifar10, celebahq, church, bedroom or cat")
    c.add_argument("--weights", required=True, help="the original .ckpt/.pth/.safetensors")
    c.add_argument("--out", required=True)
    c.set_defaults(func=_convert)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from app.nets import CheckpointError
    from app.training.data import DataError

    try:
        args.func(args)
    except (CheckpointError, DataError, ValueError) as e:
        sys.exit(f"ddpm {args.command}: {e}")


def serve_main(argv: list[str] | None = None) -> None:
    """`ddpm-serve [--model REF]... [--host H] [--port P] [--device D]` (see app/serve.py)."""
    from app.serve import main as serve

    serve(argv)


def worker_main() -> None:
    print("ddpm-worker: not yet (distributed mode lands with its issue)")


if __name__ == "__main__":
    main()
