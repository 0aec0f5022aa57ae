"""The GPU against the CPU, before any GPU figure is believed: U-Net forward, sampler steps, the engine.

    python3 -m bench.gpu_check [--device cuda] [--arch cifar10] [--batch 8] [--steps 20]

Same weights (seed 0) and inputs on both devices; TF32 is switched off here, so float32 means float32.
Tolerances, on ε and images of order 1:
- forward float32, plain and through channels_last + CUDA graphs: max |Δ| ≤ 1e-3;
- forward bfloat16 autocast, plain and through channels_last + CUDA graphs, vs CPU float32: max |Δ|
  ≤ 1e-1 (8-bit mantissa through ~30 layers);
- per-row update (step tables, fused update): max |Δ| ≤ 1e-5;
- engine, DDIM η = 0 from the same x_T, float32 plain and fast (channels_last + graphs): max |Δ| ≤ 1e-2;
- engine (two jobs in one batch) vs `generate` of each on the device (DDPM, the device's own random
  streams): max |Δ| ≤ 1e-2 — a wrong row or stream shows as O(1);
- bf16 quality, on the bundled model only (models/mnist, with its classifier): 64 DDIM-20 images from the
  bf16 fast path vs float32: mean |Δ| ≤ 5e-2 and classifier IS within 0.5 of float32's. Random weights
  amplify any rounding chaotically along a chain, so chains in bf16 are compared on a trained model only.
Prints one line per check and writes gpu_check.json; exits 1 if any check fails. With --device cpu
(bench/gpu.sh's dry run) every comparison is CPU against CPU: it exercises the code, not the GPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from app.cli import BUNDLED_MODEL
from app.diffusion import Schedule, Variance, ddim_plan, ddpm_plan
from app.engine.engine import Engine
from app.engine.fastpath import FastPath, Forward
from app.engine.steps import chain_table, fused_update
from app.engine.work import Work
from app.nets import Checkpoint, UNet, load_checkpoint
from app.sampling import generate
from bench.common import save, table
from bench.engines import Collector, sample_work
from bench.models import ARCHS, architecture

CPU = torch.device("cpu")


def checkpoint(arch: str, device: torch.device) -> Checkpoint:
    unet_config, scheduler = architecture(arch)
    torch.manual_seed(0)
    unet = UNet(unet_config).eval().to(device)
    return Checkpoint(unet=unet, scheduler=scheduler, name="check", source=f"random {arch}")


class Checks:
    def __init__(self) -> None:
        self.rows: list[dict[str, object]] = []

    def compare(
        self, name: str, got: torch.Tensor, want: torch.Tensor, *, max_tol=None, mean_tol=None
    ) -> None:
        diff = (got.detach().float().cpu() - want.detach().float().cpu()).abs()
        worst, mean = float(diff.max()), float(diff.mean())
        ok = (max_tol is None or worst <= max_tol) and (mean_tol is None or mean <= mean_tol)
        ok = ok and bool(torch.isfinite(got).all())
        tol = f"max≤{max_tol}" if max_tol is not None else f"mean≤{mean_tol}"
        self.rows.append(
            {"check": name, "max_abs": f"{worst:.2e}", "mean_abs": f"{mean:.2e}", "tol": tol, "ok": ok}
        )
        print(table(self.rows[-1:], list(self.rows[-1])), flush=True)

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.rows)


def forward_checks(checks: Checks, arch: str, device: torch.device, batch: int) -> None:
    cpu = checkpoint(arch, CPU)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cpu.channels, cpu.resolution, cpu.resolution, generator=gen)
    t = torch.randint(0, cpu.scheduler.num_train_timesteps, (batch,), generator=gen)
    with torch.inference_mode():
        want = cpu.unet(x, t)
    graphs = device.type == "cuda"
    paths = {
        "float32": (FastPath(), 1e-3),
        "float32 channels_last+graphs": (FastPath(channels_last=True, cuda_graphs=graphs), 1e-3),
        "bf16": (FastPath(dtype="bfloat16"), 1e-1),
        "bf16 channels_last+graphs": (
            FastPath(channels_last=True, dtype="bfloat16", cuda_graphs=graphs),
            1e-1,
        ),
    }
    if graphs:  # float16 autocast is CUDA-only
        paths["fp16 channels_last+graphs"] = (
            FastPath(channels_last=True, dtype="float16", cuda_graphs=True),
            1e-1,
        )
    for name, (fast, tol) in paths.items():
        forward = Forward(checkpoint(arch, device).unet, fast, device=device, max_batch=batch)
        forward.warm_up(tuple(x.shape[1:]))
        # Bucket sizes (1, half, all) and sizes padded up to the next bucket (3 into 4, batch − 1 into batch)
        for rows in (
            sorted({1, min(3, batch), batch // 2 or 1, batch - 1 or 1, batch}) if fast.padded else [batch]
        ):
            got = forward(x[:rows].to(device), t[:rows].to(device))
            checks.compare(f"forward {name}, {rows} rows", got, want[:rows], max_tol=tol)


def update_checks(checks: Checks, device: torch.device) -> None:
    s = Schedule.from_config("linear", 1000)  # the paper's β_1..β_T
    chains = [
        ("ddpm", ddpm_plan(1000, 1000), dict(eta=0.0, variance=Variance.BETA, clip_denoised=True)),
        ("ddpm", ddpm_plan(1000, 100), dict(eta=0.0, variance=Variance.POSTERIOR, clip_denoised=False)),
        ("ddim", ddim_plan(1000, 50), dict(eta=0.5, variance=Variance.BETA, clip_denoised=True)),
    ]
    gen = torch.Generator().manual_seed(2)
    xt, eps, z = (2 * torch.randn(len(chains), 3, 8, 8, generator=gen) for _ in range(3))
    results = {}
    for dev in (CPU, device):
        coef = torch.cat(
            [
                chain_table(s.to(dev), p[0].tolist(), p[1].tolist(), sampler=sampler, device=dev, **kw).coef[
                    7:8
                ]
                for sampler, p, kw in chains
            ]
        )
        results[dev.type] = fused_update(xt.to(dev), eps.to(dev), z.to(dev), coef)
    for k, name in enumerate(("x_prev", "x̂0")):
        checks.compare(f"per-row update {name}", results[device.type][k], results["cpu"][k], max_tol=1e-5)


def engine_images(
    ckpt: Checkpoint, fast: FastPath, works: list[Callable[[str], object]], *, max_batch: int = 8
) -> list[torch.Tensor]:
    collector = Collector()
    engine = Engine(ckpt, name="check", listener=collector, max_batch=max_batch, fast=fast)
    engine.start()
    ids = [f"job-{k}" for k in range(len(works))]
    try:
        for job_id, make in zip(ids, works, strict=True):
            engine.submit(make(job_id))
        return [collector.wait(job_id, timeout=600) for job_id in ids]
    finally:
        engine.stop(10)


def engine_checks(checks: Checks, arch: str, device: torch.device, steps: int) -> None:
    ckpt = checkpoint(arch, CPU)
    shape = (4, ckpt.channels, ckpt.resolution, ckpt.resolution)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(3)).numpy()

    def ddim(job_id: str) -> Work:
        work = sample_work(job_id, model="check", n=4, steps=steps, sampler="ddim", seed=4)
        work.inputs["latents"] = latents
        return work

    want = engine_images(ckpt, FastPath(), [ddim])[0]
    got = engine_images(checkpoint(arch, device), FastPath(), [ddim])[0]
    checks.compare(f"engine DDIM-{steps} float32", got, want, max_tol=1e-2)
    fast = FastPath(channels_last=True, cuda_graphs=device.type == "cuda")
    got = engine_images(checkpoint(arch, device), fast, [ddim])[0]
    checks.compare(f"engine DDIM-{steps} float32 channels_last+graphs", got, want, max_tol=1e-2)

    dev = checkpoint(arch, device)
    got = engine_images(
        dev,
        FastPath(),
        [
            lambda job_id: sample_work(job_id, model="check", n=3, steps=steps, seed=5),
            lambda job_id: sample_work(job_id, model="check", n=2, steps=steps, seed=6),
        ],
    )
    want = [generate(dev, n=3, steps=steps, seed=5).images, generate(dev, n=2, steps=steps, seed=6).images]
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        checks.compare(f"engine DDPM-{steps} vs generate, job {k}", g, w, max_tol=1e-2)


def bundled_quality(checks: Checks, device: torch.device, *, n: int = 64, steps: int = 20) -> None:
    """bf16 fast path vs float32 on the trained bundled model: image deviation and classifier IS of
    `n` DDIM images of `steps` steps."""
    from app.evaluation.classifier import classify, load_classifier
    from app.evaluation.metrics import inception_score

    images = {}
    graphs = device.type == "cuda"
    for name, fast in (
        ("float32", FastPath()),
        ("bf16", FastPath(channels_last=True, dtype="bfloat16", cuda_graphs=graphs)),
    ):
        ckpt = load_checkpoint(BUNDLED_MODEL, device=device)
        work = [lambda job_id: sample_work(job_id, model="check", n=n, steps=steps, sampler="ddim", seed=7)]
        images[name] = engine_images(ckpt, fast, work, max_batch=n)[0]
    classifier = load_classifier(BUNDLED_MODEL.parent / "mnist-classifier")
    score = {name: inception_score(classify(classifier, x)[1].numpy()) for name, x in images.items()}
    checks.compare(
        f"bundled DDIM-{steps} ×{n} bf16 fast path vs float32",
        images["bf16"],
        images["float32"],
        mean_tol=5e-2,
    )
    ok = score["bf16"] >= score["float32"] - 0.5
    row = {
        "check": "bundled classifier IS",
        "max_abs": "",
        "mean_abs": "",
        "tol": "bf16 ≥ fp32 − 0.5",
        "ok": ok,
    }
    row["value"] = f"fp32 {score['float32']:.3f}, bf16 {score['bf16']:.3f}"
    checks.rows.append(row)
    print(table([row], list(row)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="cifar10", choices=ARCHS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="sampler steps of the engine checks")
    parser.add_argument("--quality-images", type=int, default=64, help="images of the bundled-model check")
    parser.add_argument("--quality-steps", type=int, default=20, help="DDIM steps of the bundled-model check")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = False  # float32 comparisons, not TF32 ones
    torch.backends.cuda.matmul.allow_tf32 = False
    if device.type == "cuda":
        print(
            f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}; TF32 convs: "
            f"{torch.backends.cudnn.allow_tf32}"
        )
    checks = Checks()
    forward_checks(checks, args.arch, device, args.batch)
    update_checks(checks, device)
    engine_checks(checks, args.arch, device, args.steps)
    if BUNDLED_MODEL.exists() and (BUNDLED_MODEL.parent / "mnist-classifier").exists():
        bundled_quality(checks, device, n=args.quality_images, steps=args.quality_steps)
    else:
        print("bf16 quality on the bundled model: skipped, models/mnist is not there")
    print()
    print(table(checks.rows, list(checks.rows[0])))
    print(f"wrote {save('gpu_check', checks.rows, device=str(device), arch=args.arch)}")
    print("ALL CHECKS PASSED" if checks.ok else "SOME CHECKS FAILED")
    sys.exit(0 if checks.ok else 1)


if __name__ == "__main__":
    main()
