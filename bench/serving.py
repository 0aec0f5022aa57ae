"""Benchmark 3: the HTTP service under closed-loop load, per engine policy, against the raw engine.

    .venv/bin/python -m bench.serving [--model PATH | --arch bundled] [--concurrency 1,4,16,64]
        [--policies step,request,serial] [--steps 50] [--sampler ddim] [--warmup 5] [--duration 30]
        [--max-requests 256] [--threads 1] [--vs-diffusers 16] [--set dtype=bfloat16 ...]

For each policy (DDPM_ENGINE_POLICY: step-level batching, request-level batching, one request at a time)
a real `ddpm-serve` child process serves the model; at each concurrency c, c clients each POST /sample
(n = 1, stream_every 0) with ?wait=true and send the next request as soon as the answer comes. Answers
in the first --warmup seconds are not counted; then for --duration seconds (or until --max-requests
requests in all) they are: throughput is those answers over that time, latencies (p50, p95) theirs.
At c = 16 the answers come in waves (a batch's requests finish together), and a window counts whole
waves, so `images_s` is uncertain by up to c answers per window; `little_s` is c / mean latency
(Little's law for a closed loop without think time), which needs no window and has no such steps.
The raw engine rows run the same closed loop straight on an in-process Engine (step policy, the same
fast-path settings) with c submitting threads: `of_raw` (`of_raw_little`) is the service's throughput
(`little_s`) as a fraction of it. Then the same seeds are sampled under every policy and the PNG bytes
and float arrays compared.
With --vs-diffusers N, N concurrent one-image requests (step policy) race diffusers' DDIMPipeline
making the same N images in one batch, same weights and steps (--race-rounds alternating rounds,
medians). --set NAME=VALUE passes DDPM_NAME to every server. Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import itertools
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from app.engine import threads
from app.engine.engine import POLICIES, Engine
from app.engine.fastpath import FastPath
from app.nets import load_checkpoint
from app.settings import Settings
from bench.common import like_an_engine, save, set_threads, table
from bench.engines import Collector, sample_work
from bench.models import ARCHS, model_folder
from bench.sampling import diffusers_pipelines
from bench.server import serve

CHECK_SEEDS = (101, 102, 103, 104)  # sampled together under every policy; outputs must agree
FAST_SETTINGS = ("channels_last", "dtype", "compile", "cuda_graphs")


@dataclass
class Load:
    """What one concurrency level measured."""

    window: float = 0.0  # seconds from the start to the end of counting
    latencies: list[float] = field(default_factory=list)  # of the requests answered inside the window

    def row(self, *, concurrency: int, **keys: object) -> dict[str, object]:
        lat = sorted(self.latencies)
        return {
            **keys,
            "concurrency": concurrency,
            "requests": len(lat),
            "images_s": round(len(lat) / self.window, 3) if self.window else 0.0,
            # Little's law, N = X R: c clients always waiting give X = c / R, free of the window's steps.
            "little_s": round(concurrency / statistics.fmean(lat), 3) if lat else 0.0,
            "p50_s": round(statistics.median(lat), 3) if lat else "",
            "p95_s": round(lat[math.ceil(0.95 * len(lat)) - 1], 3) if lat else "",  # nearest rank
        }


@dataclass(frozen=True)
class Plan:
    """One level of closed-loop load: answers in the first `warmup` seconds are not counted (new batch
    shapes, queues filling), then `duration` seconds are, with at most `max_requests` requests sent."""

    concurrency: int
    warmup: float
    duration: float
    max_requests: int


def count_window(done: list[tuple[float, float]], begin: float, deadline: float) -> Load:
    """Requests answered between `begin` and `deadline` (times of (answer, latency) pairs), over that time
    (or up to the last answer, when every request was answered before the deadline)."""
    inside = [(end, latency) for end, latency in done if begin <= end <= deadline]
    if not inside:
        return Load()
    end = deadline if any(e > deadline for e, _ in done) else max(e for e, _ in inside)
    return Load(window=end - begin, latencies=[latency for _, latency in inside])


async def http_load(url: str, body: dict, plan: Plan) -> Load:
    """Closed loop: `concurrency` clients, each sending its next request when the previous is answered."""
    issued = 0
    seeds = itertools.count()
    done: list[tuple[float, float]] = []
    limits = httpx.Limits(
        max_connections=plan.concurrency + 4, max_keepalive_connections=plan.concurrency + 4
    )
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        begin = time.perf_counter() + plan.warmup
        deadline = begin + plan.duration

        async def worker() -> None:
            nonlocal issued
            while time.perf_counter() < deadline and issued < plan.max_requests:
                issued += time.perf_counter() >= begin  # warm-up requests are bounded by time alone
                sent = time.perf_counter()
                r = await client.post("/sample", params={"wait": "true"}, json={**body, "seed": next(seeds)})
                job = r.raise_for_status().json()
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')}")
                now = time.perf_counter()
                done.append((now, now - sent))

        await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
    return count_window(done, begin, deadline)


def engine_load(engine: Engine, collector: Collector, plan: Plan, **job) -> Load:
    """The same closed loop straight on an Engine: `concurrency` threads submitting and waiting."""
    lock = threading.Lock()
    issued = sent_total = 0
    done: list[tuple[float, float]] = []
    begin = time.perf_counter() + plan.warmup
    deadline = begin + plan.duration

    def worker() -> None:
        nonlocal issued, sent_total
        while time.perf_counter() < deadline:
            with lock:
                if issued >= plan.max_requests:
                    return
                issued += time.perf_counter() >= begin  # warm-up requests are bounded by time alone
                sent_total += 1
                seed = sent_total
            job_id = f"raw-{plan.concurrency}-{seed}"
            sent = time.perf_counter()
            engine.submit(sample_work(job_id, model=engine.name, n=1, seed=seed, **job))
            collector.wait(job_id)
            now = time.perf_counter()
            with lock:
                done.append((now, now - sent))

    threads = [threading.Thread(target=worker) for _ in range(plan.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return count_window(done, begin, deadline)


async def sample_images(url: str, body: dict, seeds: tuple[int, ...]) -> dict[int, tuple[bytes, np.ndarray]]:
    """seed → (PNG bytes, float array) for one-image jobs sent together."""
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:

        async def one(seed: int) -> tuple[int, tuple[bytes, np.ndarray]]:
            job = (await client.post("/sample", params={"wait": "true"}, json={**body, "seed": seed})).json()
            png = (await client.get(job["result"]["images"][0]["url"])).content
            npy = (await client.get(job["result"]["npy_url"])).content
            return seed, (png, np.load(io.BytesIO(npy)))

        return dict(await asyncio.gather(*(one(seed) for seed in seeds)))


async def race(url: str, body: dict, n: int) -> float:
    """Seconds until `n` concurrent one-image requests are all answered."""
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        start = time.perf_counter()
        answers = await asyncio.gather(
            *(client.post("/sample", params={"wait": "true"}, json={**body, "seed": k}) for k in range(n))
        )
        assert all(a.json()["status"] == "succeeded" for a in answers)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (diffusers layout); default: --arch")
    parser.add_argument("--arch", default="bundled", choices=ARCHS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim"))
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds per level not counted")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per level counted, at most")
    parser.add_argument("--max-requests", type=int, default=256, help="requests per level at most")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch intra-op threads, here and in the server")
    parser.add_argument("--vs-diffusers", type=int, default=16, help="0 skips the race against diffusers")
    parser.add_argument("--race-rounds", type=int, default=3, help="alternating rounds of the race (median)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting (DDPM_NAME), e.g. dtype=bfloat16; fast-path ones apply to the raw engine too",
    )
    parser.add_argument("--name", default="serving", help="results file name")
    args = parser.parse_args()
    set_threads(args.threads)
    threads.confine()  # as ddpm-serve does: the raw engine's thread alone computes in parallel
    levels = [int(c) for c in args.concurrency.split(",")]
    folder, described = model_folder(args.model, args.arch)
    overrides = dict(item.split("=", 1) for item in args.set)
    print(
        f"model: {described}; {args.device}, {threads.for_engines()} threads, {args.sampler}-{args.steps}, "
        f"settings {overrides or 'default'}"
    )
    body = {"n": 1, "steps": args.steps, "sampler": args.sampler, "stream_every": 0}
    job = dict(steps=args.steps, sampler=args.sampler)
    plans = [Plan(c, args.warmup, args.duration, args.max_requests) for c in levels]
    warm = Plan(2, 0.0, 600.0, 2)

    rows = _raw_engine(folder, args, plans, warm, _fast_path(overrides), job)
    raw_rate = {r["concurrency"]: (r["images_s"], r["little_s"]) for r in rows}
    images: dict[str, dict[int, tuple[bytes, np.ndarray]]] = {}
    extra: dict[str, object] = {}
    for policy in args.policies.split(","):
        settings = dict(engine_policy=policy, max_batch=args.max_batch, max_queued_jobs=4 * max(levels) + 64)
        with serve(folder, device=args.device, threads=args.threads, **{**settings, **overrides}) as url:
            asyncio.run(http_load(url, body, warm))
            for plan in plans:
                row = asyncio.run(http_load(url, body, plan)).row(
                    impl=f"http {policy}", concurrency=plan.concurrency
                )
                counted, little = raw_rate.get(plan.concurrency, (0.0, 0.0))
                row["of_raw"] = round(row["images_s"] / counted, 3) if counted else ""
                row["of_raw_little"] = round(row["little_s"] / little, 3) if little else ""
                rows.append(row)
                print(table(rows[-1:], list(row)), flush=True)
            images[policy] = asyncio.run(sample_images(url, body, CHECK_SEEDS))
            if policy == "step" and args.vs_diffusers:
                extra["race"] = _race_diffusers(url, folder, body, args)
    extra["identical"] = _compare(images)
    print()
    columns = "impl concurrency requests images_s little_s p50_s p95_s of_raw of_raw_little"
    print(table(rows, columns.split()))
    for key, value in extra.items():
        print(f"{key}: {value}")
    info = dict(model=described, device=args.device, threads=threads.for_engines(), settings=overrides)
    print(f"wrote {save(args.name, rows, **info, **job, **extra)}")


def _fast_path(overrides: dict[str, str]) -> FastPath:
    """The raw engine's fast path from the same settings as the server's."""
    settings = Settings(device="auto", **{k: v for k, v in overrides.items() if k in FAST_SETTINGS})
    return settings.fast_path()


def _raw_engine(
    folder: Path, args: argparse.Namespace, plans: list[Plan], warm: Plan, fast: FastPath, job: dict
) -> list[dict]:
    collector = Collector()
    ckpt = load_checkpoint(folder, device=args.device)
    engine = Engine(ckpt, name="raw", listener=collector, max_batch=args.max_batch, fast=fast)
    engine.start()
    engine_load(engine, collector, warm, **job)
    rows = []
    try:
        for plan in plans:
            load = engine_load(engine, collector, plan, **job)
            rows.append(
                load.row(impl="raw engine", concurrency=plan.concurrency, of_raw=1.0, of_raw_little=1.0)
            )
            print(table(rows[-1:], list(rows[-1])), flush=True)
    finally:
        engine.stop(10)
    return rows


def _race_diffusers(url: str, folder: Path, body: dict, args: argparse.Namespace) -> dict[str, object]:
    """N concurrent requests through the service vs one DDIMPipeline batch of N, same weights and steps;
    alternating rounds, medians."""
    n = args.vs_diffusers
    ddim = diffusers_pipelines(folder, torch.device(args.device))["ddim"]
    pipe = functools.partial(like_an_engine, ddim)  # the engine's threads (the raw engine has stopped)
    pipe(n, 2)  # set-up out of the timing
    asyncio.run(race(url, {**body, "sampler": "ddim"}, n))  # the service's first batch of n, likewise
    ours, theirs = [], []
    for _ in range(args.race_rounds):
        ours.append(asyncio.run(race(url, {**body, "sampler": "ddim"}, n)))
        start = time.perf_counter()
        pipe(n, args.steps)
        theirs.append(time.perf_counter() - start)
    result = {
        "n": n,
        "steps": args.steps,
        "rounds": args.race_rounds,
        "ours_http_s": round(statistics.median(ours), 3),
        "diffusers_batch_s": round(statistics.median(theirs), 3),
    }
    result["ratio"] = round(result["diffusers_batch_s"] / result["ours_http_s"], 3)
    print(f"race: {result}", flush=True)
    return result


def _compare(images: dict[str, dict[int, tuple[bytes, np.ndarray]]]) -> dict[str, object]:
    """Every policy against the first: equal PNG bytes per seed? Else how many 8-bit pixels differ, by how
    much, and the largest difference of the float images."""
    policies = list(images)
    if not policies:
        return {}
    first = images[policies[0]]
    pixels = {p: {s: _pixels(images[p][s][0]) for s in CHECK_SEEDS} for p in policies}
    differing = [
        np.abs(pixels[p][s] - pixels[policies[0]][s]) for p in policies[1:] for s in CHECK_SEEDS
    ] or [np.zeros(1)]
    return {
        "policies": policies,
        "seeds": list(CHECK_SEEDS),
        "same_png_bytes": all(images[p][s][0] == first[s][0] for p in policies for s in CHECK_SEEDS),
        "pixels_differing": int(sum((d > 0).sum() for d in differing)),
        "pixels_total": int(sum(d.size for d in differing)),
        "max_pixel_diff": int(max(d.max() for d in differing)),
        "max_float_diff": max(
            float(np.abs(images[p][s][1] - first[s][1]).max()) for p in policies for s in CHECK_SEEDS
        ),
    }


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


if __name__ == "__main__":
    main()
