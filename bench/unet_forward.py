"""Benchmark 1: one U-Net forward, ours vs diffusers' UNet2DModel with identical weights, same process.

    .venv/bin/python bench/unet_forward.py [--device cpu|cuda] [--batches 1,8,32] [--models cifar10,mnist]

Prints a table (ms per forward, ratio diffusers/ours, GFLOP per image, achieved GFLOP/s) and writes
bench/results/unet_forward.json. A ratio above 1 means ours is faster.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

from app.cli import BUNDLED_MODEL
from app.nets import UNet, UNetConfig, load_checkpoint
from app.nets.presets import PRESETS
from bench.common import save, table, timeit


def configs() -> dict[str, UNetConfig]:
    out = {"cifar10": PRESETS["cifar10"].unet}
    if BUNDLED_MODEL.exists():
        out["mnist"] = load_checkpoint(BUNDLED_MODEL).unet.config
    return out


def flops_per_image(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x[:1], t[:1])
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--models", default="cifar10,mnist")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for name, cfg in configs().items():
        if name not in args.models.split(","):
            continue
        torch.manual_seed(0)
        theirs = UNet2DModel(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")})
        ours = UNet(cfg)
        ours.load_state_dict(theirs.state_dict())
        ours, theirs = ours.to(device).eval(), theirs.to(device).eval()
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
            t = torch.randint(0, 1000, (batch,), device=device)
            flops = flops_per_image(ours, x, t)
            with torch.inference_mode():
                ours_s = timeit(lambda m=ours, x=x, t=t: m(x, t), device=device, repeat=args.repeat)
                theirs_s = timeit(
                    lambda m=theirs, x=x, t=t: m(x, t).sample, device=device, repeat=args.repeat
                )
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "ours_ms": round(ours_s * 1e3, 2),
                    "diffusers_ms": round(theirs_s * 1e3, 2),
                    "ratio": round(theirs_s / ours_s, 3),
                    "gflop_per_image": round(flops / 1e9, 3),
                    "ours_gflop_s": round(flops * batch / ours_s / 1e9, 1),
                }
            )
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print()
    print(table(rows, list(rows[0])))
    print(f"wrote {save('unet_forward', rows, device=str(device))}")


if __name__ == "__main__":
    main()
