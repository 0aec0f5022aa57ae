"""Benchmark 1: one U-Net forward, ours vs diffusers' UNet2DModel with identical weights, same process.

    .venv/bin/python -m bench.unet_forward [--device cpu|cuda] [--batches 1,8,32] [--models cifar10,mnist]
        [--fast bf16] [--threads N] [--peak-tflops 989]

Prints a table (ms per forward of diffusers, ours eager and ours through the fast path named by --fast,
a comma list of channels_last, bf16, fp16, compile, graphs; ratios diffusers/ours; GFLOP per image and
the achieved TFLOP/s of ours eager and of the fast path, with its fraction of --peak-tflops) and writes
bench/results/unet_forward.json, row by row. A ratio above 1 means ours is faster. All are timed in
interleaved rounds, with two more: the forward's convolutions alone (each with the input it got, one
after the other), in ours eager's float32 and in the fast path's memory format and dtype. Convolutions
are nearly all of the FLOPs, so `conv_share` (their part of the forward's time) says how much the rest
(GroupNorm, SiLU, attention, additions, layout changes: little arithmetic, much memory traffic) costs, and
`bound` (diffusers' time over the fast path's convolutions alone) is the ratio a forward that spent
nothing beside those convolutions would reach: on a CPU no implementation on the same kernels gets past
it; on a GPU it is looser (the convolutions alone are launched eagerly, one by one, where CUDA graphs or
compile launch them together, so at small batches the fast path may beat it).
Without diffusers installed (a bare GPU machine), its columns are left out and the rest still runs.
"""

from __future__ import annotations

import argparse

import torch

from app.cli import BUNDLED_MODEL
from app.engine.fastpath import Forward
from app.nets import UNet, UNetConfig, load_checkpoint
from bench.common import (
    convolutions,
    convolutions_alone,
    fast_path,
    flops_per_image,
    interleaved,
    save,
    set_threads,
    table,
)
from bench.models import BUNDLED_ARCH, architecture


def config(name: str) -> UNetConfig:
    """ "mnist" is the bundled model's network (its own config when models/mnist exists); other names are
    bench.models architectures: the paper's presets ("cifar10", …) and "tiny"."""
    if name == "mnist":
        return load_checkpoint(BUNDLED_MODEL).unet.config if BUNDLED_MODEL.exists() else BUNDLED_ARCH
    return architecture(name)[0]


def diffusers_unet(cfg: UNetConfig) -> torch.nn.Module | None:
    """diffusers' UNet2DModel of `cfg`, or None (said once) where diffusers is not installed."""
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        print(f"diffusers is not installed ({e}): no diffusers columns")
        return None
    return UNet2DModel(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--models", default="cifar10,mnist")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--fast", default="bf16", help="fast-path flags ('' skips the fast row)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, help="device peak for the `peak` column")
    parser.add_argument("--name", default="unet_forward", help="results file name")
    args = parser.parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    extra = dict(device=str(device), threads=torch.get_num_threads(), fast=args.fast, repeat=args.repeat)
    rows = []
    for name in args.models.split(","):
        cfg = config(name)
        torch.manual_seed(0)
        ours = UNet(cfg)
        theirs = diffusers_unet(cfg)
        if theirs is not None:
            ours.load_state_dict(theirs.state_dict())
            theirs = theirs.to(device).eval()
        ours = ours.to(device).eval()
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
            t = torch.randint(0, 1000, (batch,), device=device)
            flops = flops_per_image(ours, x, t)
            calls = convolutions(ours, x, t)
            fns = {"ours": lambda m=ours, x=x, t=t: m(x, t), "convs": convolutions_alone(calls)}
            if theirs is not None:
                fns["diffusers"] = lambda m=theirs, x=x, t=t: m(x, t).sample
            if args.fast:
                spec = fast_path(args.fast, batch=batch)
                copy = UNet(cfg).to(device)
                copy.load_state_dict(ours.state_dict())
                forward = Forward(copy, spec, device=device, max_batch=batch)
                forward.warm_up(tuple(x.shape[1:]))
                fns["fast"] = lambda f=forward, x=x, t=t: f(x, t)
                fns["fast_convs"] = convolutions_alone(
                    calls, channels_last=spec.channels_last, dtype=spec.dtype
                )
            with torch.inference_mode():
                ms = {k: v * 1e3 for k, v in interleaved(fns, device=device, repeat=args.repeat).items()}
            del calls, fns
            row: dict[str, object] = {"model": name, "batch": batch}
            if "diffusers" in ms:
                row |= {
                    "diffusers_ms": round(ms["diffusers"], 2),
                    "ratio": round(ms["diffusers"] / ms["ours"], 3),
                }
            row |= {
                "ours_ms": round(ms["ours"], 2),
                "conv_share": round(ms["convs"] / ms["ours"], 3),
                "gflop_per_image": round(flops / 1e9, 3),
                "ours_tflop_s": round(flops * batch / ms["ours"] / 1e9, 3),
            }
            if "fast" in ms:
                row["fast_ms"] = round(ms["fast"], 2)
                if "diffusers" in ms:
                    row["fast_ratio"] = round(ms["diffusers"] / ms["fast"], 3)
                    row["bound"] = round(ms["diffusers"] / ms["fast_convs"], 3)
                row["fast_conv_share"] = round(ms["fast_convs"] / ms["fast"], 3)
                row["fast_tflop_s"] = round(flops * batch / ms["fast"] / 1e9, 3)
                if args.peak_tflops:
                    row["fast_peak"] = round(row["fast_tflop_s"] / args.peak_tflops, 4)
            rows.append(row)
            print(table(rows[-1:], list(rows[-1])), flush=True)
            save(args.name, rows, **extra)  # row by row: a run stopped by its time limit keeps what it had
    print()
    print(table(rows, list(dict.fromkeys(k for row in rows for k in row))))
    print(f"wrote {save(args.name, rows, **extra)}")


if __name__ == "__main__":
    main()
