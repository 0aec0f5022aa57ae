"""Benchmark 1: one U-Net forward, ours vs diffusers' UNet2DModel with identical weights, same process.

    .venv/bin/python -m bench.unet_forward [--device cpu|cuda] [--batches 1,8,32] [--models cifar10,mnist]
        [--fast bf16] [--threads N] [--peak-tflops 989]

Prints a table (ms per forward of diffusers, ours eager and ours through the fast path named by --fast,
a comma list of channels_last, bf16, fp16, compile, graphs; ratios diffusers/ours; GFLOP per image and
the achieved TFLOP/s of ours eager and of the fast path, with its fraction of --peak-tflops) and writes
bench/results/unet_forward.json. A ratio above 1 means ours is faster. The three are timed in
interleaved rounds. One plain 3×3 convolution is timed first, in the same process, in float32 and in the
fast path's dtype and memory format: `ours_of_conv` and `fast_of_conv` are the U-Net's TFLOP/s as a
fraction of it. Convolutions are nearly all of the FLOPs, so this says how far the rest of the network
(GroupNorm, SiLU, attention, additions: little arithmetic, much memory traffic) holds a forward below
the rate of its convolutions.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DModel

from app.cli import BUNDLED_MODEL
from app.engine.fastpath import Forward
from app.nets import UNet, UNetConfig, load_checkpoint
from bench.common import conv_tflop_s, fast_path, flops_per_image, interleaved, save, set_threads, table
from bench.models import BUNDLED_ARCH, architecture


def config(name: str) -> UNetConfig:
    """ "mnist" is the bundled model's network (its own config when models/mnist exists); other names are
    bench.models architectures: the paper's presets ("cifar10", …) and "tiny"."""
    if name == "mnist":
        return load_checkpoint(BUNDLED_MODEL).unet.config if BUNDLED_MODEL.exists() else BUNDLED_ARCH
    return architecture(name)[0]


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
    fast = fast_path(args.fast, batch=1)
    conv = {
        "ours": conv_tflop_s(torch.float32, device=device),
        "fast": conv_tflop_s(getattr(torch, fast.dtype), device=device, channels_last=fast.channels_last),
    }
    print(f"one 3x3 convolution: float32 {conv['ours']:.3f} TFLOP/s, as the fast path {conv['fast']:.3f}")
    rows = []
    for name in args.models.split(","):
        cfg = config(name)
        torch.manual_seed(0)
        theirs = UNet2DModel(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")})
        ours = UNet(cfg)
        ours.load_state_dict(theirs.state_dict())
        ours, theirs = ours.to(device).eval(), theirs.to(device).eval()
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
            t = torch.randint(0, 1000, (batch,), device=device)
            flops = flops_per_image(ours, x, t)
            fns = {
                "diffusers": lambda m=theirs, x=x, t=t: m(x, t).sample,
                "ours": lambda m=ours, x=x, t=t: m(x, t),
            }
            if args.fast:
                fast = UNet(cfg).to(device)
                fast.load_state_dict(ours.state_dict())
                forward = Forward(fast, fast_path(args.fast, batch=batch), device=device, max_batch=batch)
                forward.warm_up(tuple(x.shape[1:]))
                fns["fast"] = lambda f=forward, x=x, t=t: f(x, t)
            with torch.inference_mode():
                ms = {k: v * 1e3 for k, v in interleaved(fns, device=device, repeat=args.repeat).items()}
            row = {
                "model": name,
                "batch": batch,
                "diffusers_ms": round(ms["diffusers"], 2),
                "ours_ms": round(ms["ours"], 2),
                "ratio": round(ms["diffusers"] / ms["ours"], 3),
                "gflop_per_image": round(flops / 1e9, 3),
                "ours_tflop_s": round(flops * batch / ms["ours"] / 1e9, 3),
                "ours_of_conv": round(flops * batch / ms["ours"] / 1e9 / conv["ours"], 3),
            }
            if "fast" in ms:
                row["fast_ms"] = round(ms["fast"], 2)
                row["fast_ratio"] = round(ms["diffusers"] / ms["fast"], 3)
                row["fast_tflop_s"] = round(flops * batch / ms["fast"] / 1e9, 3)
                row["fast_of_conv"] = round(flops * batch / ms["fast"] / 1e9 / conv["fast"], 3)
                if args.peak_tflops:
                    row["fast_peak"] = round(row["fast_tflop_s"] / args.peak_tflops, 4)
            rows.append(row)
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print()
    print(table(rows, list(rows[0])))
    extra = dict(device=str(device), threads=torch.get_num_threads(), fast=args.fast, conv_tflop_s=conv)
    print(f"wrote {save(args.name, rows, **extra)}")


if __name__ == "__main__":
    main()
