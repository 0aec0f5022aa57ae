"""Benchmark 2: images/s of whole sampling runs, ours vs diffusers' pipelines on the same checkpoint.

    .venv/bin/python -m bench.sampling [--model PATH | --arch bundled|cifar10] [--batch 8]
        [--steps-ddpm 1000] [--steps-ddim 50] [--fast bf16] [--rows diffusers,generate,engine,fast]
        [--repeat 1] [--threads N] [--device cuda] [--peak-tflops 989] [--name sampling]

For each sampler (1000-step ancestral, Algorithm 2; 50-step DDIM, η = 0; both on trailing timesteps) the
rows (--rows) are: diffusers' DDPMPipeline / DDIMPipeline, our library `generate`, our Engine with the
plain forward, and our Engine with the fast path named by --fast (a comma list of channels_last, bf16,
fp16, compile, graphs). Every row runs the same number of U-Net forwards on the same batch from the same
weights file; rows are timed in interleaved rounds. `ratio` is images/s over diffusers' (above 1: ours
is faster). With --peak-tflops, `peak` is the fraction of that peak the U-Net's FLOPs reach. Shorten a
CPU run with e.g. --steps-ddpm 100: images/s then scale by 100/1000 to the full chain.
On a CPU prefer --threads 1: with more, the main thread (diffusers, `generate`) and each engine's thread
hold an OpenMP team apiece, and libgomp then slows every team (app/engine/threads.py), so all rows run
below the speed a serving process gets.
Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import itertools
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from app.engine.engine import Engine
from app.engine.fastpath import FastPath
from app.nets import Checkpoint, load_checkpoint
from app.sampling import generate
from bench.common import (
    H200_BF16_DENSE_TFLOPS,
    fast_path,
    flops_per_image,
    interleaved,
    save,
    set_threads,
    sync,
    table,
)
from bench.engines import Collector, sample_work
from bench.models import ARCHS, model_folder


def diffusers_pipelines(folder: Path, device: torch.device) -> dict[str, Callable[..., object]]:
    """sampler → pipeline callable(batch_size, num_inference_steps), trailing timesteps like ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

        unet = UNet2DModel.from_pretrained(folder).to(device).eval()
        config = DDPMScheduler.from_pretrained(folder).config
    trailing = dict(timestep_spacing="trailing")
    pipes = {
        "ddpm": DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(config, **trailing)),
        "ddim": DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(config, **trailing)),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=device)

    def runner(sampler: str) -> Callable[..., object]:
        def run(batch: int, steps: int) -> object:
            images = pipes[sampler](
                batch_size=batch,
                num_inference_steps=steps,
                generator=generator.manual_seed(0),
                output_type="pt",
            )
            sync(device)  # the images are made, not only queued on the GPU: as ours, which end on the host
            return images

        return run

    return {sampler: runner(sampler) for sampler in pipes}


ROWS = ("diffusers", "generate", "engine", "fast")


class EngineRunner:
    """An Engine of its own checkpoint, started once; each call samples one batch as one job."""

    def __init__(self, ckpt: Checkpoint, *, batch: int, fast: FastPath) -> None:
        self.collector = Collector()
        self.engine = Engine(ckpt, name="bench", listener=self.collector, max_batch=batch, fast=fast)
        self.engine.start()
        self.variance = "posterior" if ckpt.scheduler.variance_type == "fixed_small" else "beta"
        self._ids = itertools.count()

    def __call__(self, sampler: str, batch: int, steps: int) -> torch.Tensor:
        job_id = f"job-{next(self._ids)}"
        work = sample_work(
            job_id, model="bench", n=batch, steps=steps, sampler=sampler, variance=self.variance
        )
        self.engine.submit(work)
        return self.collector.wait(job_id)

    def stop(self) -> None:
        self.engine.stop(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (diffusers layout); default: --arch")
    parser.add_argument("--arch", default="bundled", choices=ARCHS, help="random-weight architecture")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps-ddpm", type=int, default=1000, help="0 skips the ancestral sampler")
    parser.add_argument("--steps-ddim", type=int, default=50, help="0 skips DDIM")
    parser.add_argument("--fast", default="bf16", help="fast-path flags of the last row ('' skips it)")
    parser.add_argument("--repeat", type=int, default=1, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, help=f"device peak, e.g. {H200_BF16_DENSE_TFLOPS}")
    parser.add_argument("--rows", default=",".join(ROWS), help="rows to run, of " + ", ".join(ROWS))
    parser.add_argument("--name", default="sampling", help="results file name")
    args = parser.parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    folder, described = model_folder(args.model, args.arch)
    print(f"model: {described}; device {device}, batch {args.batch}, threads {torch.get_num_threads()}")

    ours = load_checkpoint(folder, device=device)
    flops = flops_per_image(ours.unet, *_probe(ours, device))
    wanted = set(args.rows.split(","))
    if unknown := wanted - set(ROWS):
        raise SystemExit(f"unknown --rows {sorted(unknown)}; known: {', '.join(ROWS)}")
    engines = {}
    if "engine" in wanted:
        plain = EngineRunner(load_checkpoint(folder, device=device), batch=args.batch, fast=FastPath())
        engines["ours engine"] = plain
    if args.fast and "fast" in wanted:  # its own copy of the weights: channels_last converts them in place
        fast = fast_path(args.fast, batch=args.batch)
        engines[f"ours engine {args.fast}"] = EngineRunner(
            load_checkpoint(folder, device=device), batch=args.batch, fast=fast
        )
    pipelines = {}
    if "diffusers" in wanted:
        try:
            pipelines = diffusers_pipelines(folder, device)
        except ImportError as e:  # a bare GPU machine: the rows of ours still run
            print(f"diffusers is not installed ({e}): no diffusers rows")

    rows = []
    extra = dict(
        device=str(device),
        model=described,
        threads=torch.get_num_threads(),
        fast=args.fast,
        repeat=args.repeat,
    )
    for sampler, steps in (("ddpm", args.steps_ddpm), ("ddim", args.steps_ddim)):
        if not steps:
            continue
        fns: dict[str, Callable[[int], object]] = {}
        if pipelines:
            fns["diffusers"] = lambda s, p=pipelines[sampler]: p(args.batch, s)
        if "generate" in wanted:
            fns["ours generate"] = lambda s, sampler=sampler: generate(
                ours, n=args.batch, steps=s, sampler=sampler, seed=0
            )
        for name, runner in engines.items():
            fns[name] = lambda s, r=runner, sampler=sampler: r(sampler, args.batch, s)
        for fn in fns.values():  # set-up costs (allocator, oneDNN primitives) out of the timing
            fn(2)
        seconds = interleaved(
            {name: (lambda fn=fn, steps=steps: fn(steps)) for name, fn in fns.items()},
            device=device,
            repeat=args.repeat,
            warmup=0,
        )
        base = seconds.get("diffusers")
        for name, s in seconds.items():
            images_s = args.batch / s
            row = {
                "sampler": sampler,
                "steps": steps,
                "batch": args.batch,
                "impl": name,
                "seconds": round(s, 3),
                "images_s": round(images_s, 3),
                "ratio": round(base / s, 3) if base else "",
                "tflop_s": round(images_s * steps * flops / 1e12, 3),
            }
            if args.peak_tflops:
                row["peak"] = round(row["tflop_s"] / args.peak_tflops, 4)
            rows.append(row)
            print(table(rows[-1:], list(row)), flush=True)
        save(args.name, rows, gflop_per_image_step=round(flops / 1e9, 3), **extra)  # a time limit keeps these
    for runner in engines.values():
        runner.stop()
    print()
    print(table(rows, list(rows[0])))
    print(f"wrote {save(args.name, rows, gflop_per_image_step=round(flops / 1e9, 3), **extra)}")


def _probe(ckpt: Checkpoint, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(1, ckpt.channels, ckpt.resolution, ckpt.resolution, device=device)
    return x, torch.zeros(1, dtype=torch.long, device=device)


if __name__ == "__main__":
    main()
